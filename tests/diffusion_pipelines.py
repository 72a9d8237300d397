"""A tiny Stable Diffusion pipeline built from config, for the diffusion service's tests.

diffusers' own tests build their components after `torch.manual_seed(0)` (`get_dummy_components()`); this does
the same and saves them with `save_pretrained`, so the tests load a real checkpoint directory (model_index.json,
one folder per component, safetensors weights, a byte-level CLIP tokenizer) through `from_pretrained`, offline,
and render 64x64 in a few steps on the CPU in well under a second.
"""

import io
import json
import tempfile
import zipfile
from functools import cache
from pathlib import Path

_FIXED_TIME = (2024, 1, 1, 0, 0, 0)  # zip entry timestamps: the same pipeline zips to the same bytes
# A handful of merges over the byte alphabet, so the tokenizer's BPE has real work to do on common words.
_MERGES = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("a", "n"),
           ("an", "d</w>"), ("i", "n"), ("o", "n</w>"), ("r", "e"), ("e", "d</w>")]
START, END = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP's byte-to-unicode table: every byte a printable character, so BPE never sees an unknown."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            characters.append(256 + extra)
            extra += 1
    return [chr(code) for code in characters]


def write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """vocab.json (the byte alphabet, each also as a word end, the merges' results, the two special tokens) and
    merges.txt, in CLIP's format."""
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [character + "</w>" for character in alphabet] + [a + b for a, b in _MERGES] + [START, END]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
    return vocab_file, merges_file


def tiny_tokenizer():
    """A byte-level CLIPTokenizer from the files write_tokenizer_files writes (CLIP's 77-token context)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as scratch:
        vocab_file, merges_file = write_tokenizer_files(Path(scratch))
        return CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=77)


def build_tiny_pipeline(directory: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline (UNet and VAE of widths 32 and 64, a 2-layer CLIP text encoder of width 32, a
    PNDM scheduler as SD 1.x ships, no safety checker) saved as a pipeline directory; 64x64 by default."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def build_tiny_sdxl_pipeline(directory: Path, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline of the same size (two CLIP text encoders of width 32, the second with a
    projection; a UNet with SDXL's size-and-crop conditioning; Euler, as SDXL ships), saved as a directory."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    # The added conditioning: 6 size/crop numbers embedded at width 8, and the second encoder's pooled 32.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, layer_norm_eps=1e-5, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(config), tokenizer=tokenizer,
                                         text_encoder_2=CLIPTextModelWithProjection(config), tokenizer_2=tokenizer,
                                         unet=unet, scheduler=scheduler)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def zip_directory(directory: Path, prefix: str = "") -> bytes:
    """The directory's files zipped in name order with a fixed date: the same files give the same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            archive.writestr(zipfile.ZipInfo(prefix + path.relative_to(directory).as_posix(), _FIXED_TIME),
                             path.read_bytes(), compress_type=zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


@cache
def tiny_pipeline_zip(seed: int = 0) -> bytes:
    """The tiny pipeline directory, zipped (what a user uploads to import a pipeline); built once per process."""
    with tempfile.TemporaryDirectory(prefix="tiny-pipeline-") as scratch:
        return zip_directory(build_tiny_pipeline(Path(scratch) / "pipeline", seed))
