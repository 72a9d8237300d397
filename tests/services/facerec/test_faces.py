"""The face service with the real dlib and FER weights on skimage's sample images.

HOG detection costs ~0.15 s per image and TensorFlow ~5 s to set up once, so the models are shared by
module-scoped fixtures; the CNN detector (~3 s per 512 px image on 2 cores) runs exactly once.
"""

import hashlib
import io
import json
import threading

import dlib
import numpy as np
import pytest
from PIL import Image, ImageChops, ImageFilter
from skimage import data

from percept.predictor import PredictRequest
from services.facerec.expressions import LABELS, ExpressionModel, expression_crop, packaged_weights_path
from services.facerec.faces import (
    CHIP_SIZE,
    CNN_FILE,
    EMBEDDING_SIZE,
    MIN_HOG_SCORE,
    FaceAnalyzer,
    face_distance,
    to_rgb_array,
)
from services.facerec.memes import CAPTIONS, pick_caption, render_meme
from services.facerec.predictors import (
    DEFAULT_MIN_SHARPNESS,
    FaceDetectPredictor,
    FaceEmbedPredictor,
    FaceIdentifyPredictor,
    FaceVerifyPredictor,
    MemePredictor,
)
from services.facerec.service import SERVICE

# The astronaut's face (dlib HOG box [175, 76, 91, 91]) and her mission patch, a HOG false positive.
ASTRONAUT_FACE_CENTRE = (220, 121)
MISSION_PATCH_CENTRE = (171, 380)


def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def coffee() -> Image.Image:
    return Image.fromarray(data.coffee())


def lfw_face() -> Image.Image:
    """Another person: lfw_subset's 4th face (25 px) upscaled to 200 px on a grey 512 px canvas."""
    face = Image.fromarray((data.lfw_subset()[3] * 255).astype(np.uint8)).resize((200, 200), Image.BICUBIC)
    canvas = Image.new("RGB", (512, 512), (128, 128, 128))
    canvas.paste(face.convert("RGB"), (156, 156))
    return canvas


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    both = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    both.paste(left, (0, 0))
    both.paste(right, (left.width, 0))
    return both


def job(*images: Image.Image, **params) -> PredictRequest:
    return PredictRequest(images=list(images), params=params)


def centre(box: list[int]) -> tuple[float, float]:
    return box[0] + box[2] / 2, box[1] + box[3] / 2


def near(point: tuple[float, float], target: tuple[float, float], tolerance: float = 20) -> bool:
    return abs(point[0] - target[0]) <= tolerance and abs(point[1] - target[1]) <= tolerance


def error_code(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value).partition("]")[0] + "]"


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    analyzer = FaceAnalyzer()
    analyzer.setup()
    return analyzer


@pytest.fixture(scope="module")
def expression_model() -> ExpressionModel:
    model = ExpressionModel()
    model.setup()
    return model


@pytest.fixture(scope="module")
def detect(analyzer, expression_model) -> FaceDetectPredictor:
    return FaceDetectPredictor(analyzer=analyzer, expression_model=expression_model)


@pytest.fixture(scope="module")
def embed(analyzer) -> FaceEmbedPredictor:
    return FaceEmbedPredictor(analyzer=analyzer)


@pytest.fixture(scope="module")
def verify(analyzer) -> FaceVerifyPredictor:
    return FaceVerifyPredictor(analyzer=analyzer)


@pytest.fixture(scope="module")
def identify(analyzer) -> FaceIdentifyPredictor:
    return FaceIdentifyPredictor(analyzer=analyzer)


@pytest.fixture(scope="module")
def memes(analyzer, expression_model) -> MemePredictor:
    return MemePredictor(analyzer=analyzer, expression_model=expression_model)


@pytest.fixture(scope="module")
def astronaut_faces(analyzer):
    return analyzer.analyze(astronaut())


@pytest.fixture(scope="module")
def astronaut_meme(memes):
    [output] = memes.predict([job(astronaut(), seed=1)])
    return output


# -- detection ---------------------------------------------------------------------------------------------


def test_astronaut_has_exactly_one_face_with_hog(astronaut_faces):
    [face] = astronaut_faces

    assert near(centre(face.box), ASTRONAUT_FACE_CENTRE)
    assert 70 <= face.box[2] <= 120
    assert face.score >= MIN_HOG_SCORE
    assert len(face.embedding) == EMBEDDING_SIZE
    assert face.chip.size == (CHIP_SIZE, CHIP_SIZE)
    assert face.sharpness > DEFAULT_MIN_SHARPNESS
    as_json = json.loads(json.dumps(face.to_dict()))
    assert "chip" not in as_json and as_json["box"] == face.box


def test_the_mission_patch_false_positive_is_filtered_out(analyzer):
    # dlib's own threshold (0) reports the patch as a face: the score filter is what removes it.
    rects, scores, _ = dlib.get_frontal_face_detector().run(to_rgb_array(astronaut()), 1, 0.0)
    raw_centres = [(r.left() + r.width() / 2, r.top() + r.height() / 2) for r in rects]
    assert any(near(c, MISSION_PATCH_CENTRE, 30) for c in raw_centres), (raw_centres, scores)

    detections = analyzer.detect(astronaut())

    assert len(detections) == 1
    assert near(centre([detections[0].rect.left(), detections[0].rect.top(), detections[0].rect.width(),
                        detections[0].rect.height()]), ASTRONAUT_FACE_CENTRE)


def test_astronaut_has_exactly_one_face_with_cnn(detect, astronaut_faces):
    # The only CNN call of the file (~3 s).
    [output] = detect.predict([job(astronaut(), detector="cnn")])

    [face] = output["faces"]
    assert near(centre(face["box"]), centre(astronaut_faces[0].box))
    assert face["score"] > 0.5  # mmod confidence (1.06 measured)
    assert face["expression"] is None


def test_coffee_has_no_face(analyzer):
    assert analyzer.analyze(coffee()) == []


def test_two_faces_side_by_side_are_both_found_largest_first(analyzer, identify, astronaut_faces):
    image = side_by_side(astronaut(), lfw_face())

    faces = analyzer.analyze(image)

    assert len(faces) == 2
    assert faces[0].area >= faces[1].area
    assert faces[0].box[0] >= 512 and faces[1].box[0] < 512  # the upscaled lfw face is the larger one
    [output] = identify.predict([job(image)])
    assert [face["box"] for face in output["faces"]] == [face.box for face in faces]
    assert all(len(face["embedding"]) == EMBEDDING_SIZE for face in output["faces"])
    assert face_distance(output["faces"][1]["embedding"], astronaut_faces[0].embedding) < 0.1


def test_landmarks_5_or_68_points(detect):
    [five] = detect.predict([job(astronaut())])
    [sixty_eight] = detect.predict([job(astronaut(), landmarks=68)])

    for output, count in ((five, 5), (sixty_eight, 68)):
        [face] = output["faces"]
        assert len(face["landmarks"]) == count
        x, y, w, h = face["box"]
        inside = [x - w / 2 <= px <= x + 1.5 * w and y - h / 2 <= py <= y + 1.5 * h for px, py in face["landmarks"]]
        assert all(inside), face["landmarks"]


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_other_image_modes_are_converted_to_rgb(detect, astronaut_faces, mode):
    [output] = detect.predict([job(astronaut().convert(mode))])

    [face] = output["faces"]
    assert near(centre(face["box"]), centre(astronaut_faces[0].box), 5)


def test_exif_orientation_is_applied(detect, astronaut_faces):
    # Stored rotated with an EXIF tag saying "rotate 90 degrees clockwise to display", as phones do.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    astronaut().transpose(Image.Transpose.ROTATE_90).save(buffer, format="PNG", exif=exif)
    stored = Image.open(io.BytesIO(buffer.getvalue()))
    assert detect.analyzer.analyze(Image.fromarray(np.asarray(stored))) == []  # the pixels alone: no face

    [output] = detect.predict([job(stored)])

    [face] = output["faces"]
    assert near(centre(face["box"]), centre(astronaut_faces[0].box), 5)


# -- embeddings, enrollment and verification ---------------------------------------------------------------


def test_flipped_and_resized_astronaut_is_the_same_person(verify):
    flipped = astronaut().transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((400, 400), Image.LANCZOS)

    [output] = verify.predict([job(astronaut(), flipped)])

    assert output["same_person"] is True
    assert output["distance"] < 0.3  # 0.197 measured; dlib's tolerance is 0.6
    assert output["threshold"] == 0.6
    assert len(output["faces"]) == 2


def test_another_person_is_farther_than_the_threshold(verify):
    # camera()'s profile face scores -0.11 with HOG (under MIN_HOG_SCORE): another frontal face instead.
    [output] = verify.predict([job(astronaut(), lfw_face())])

    assert output["same_person"] is False
    assert output["distance"] > 0.7  # 0.84 measured


def test_verify_threshold_is_honoured(verify):
    [output] = verify.predict([job(astronaut(), lfw_face(), threshold=0.9)])

    assert output["same_person"] is True
    assert output["threshold"] == 0.9


def test_verify_names_the_image_without_a_face(verify):
    with pytest.raises(ValueError, match=r"^\[no_face\] .*image_b"):
        verify.predict([job(astronaut(), coffee())])


def test_enrollment_embeds_the_one_face(embed, astronaut_faces):
    [output] = embed.predict([job(astronaut())])

    assert output["faces_found"] == 1
    face = output["face"]
    assert face["box"] == astronaut_faces[0].box
    assert len(face["embedding"]) == EMBEDDING_SIZE
    assert face_distance(face["embedding"], astronaut_faces[0].embedding) < 1e-6
    assert json.loads(json.dumps(output)) == output


def test_enrollment_refuses_two_faces(embed):
    with pytest.raises(ValueError) as excinfo:
        embed.predict([job(side_by_side(astronaut(), lfw_face()))])

    assert error_code(excinfo) == "[multiple_faces]"


def test_enrollment_refuses_an_image_without_a_face(embed):
    with pytest.raises(ValueError) as excinfo:
        embed.predict([job(coffee())])

    assert str(excinfo.value) == (
        "[no_face] No face was found in the image; send a photo with one clearly visible face."
    )


def test_enrollment_refuses_a_tiny_face_unless_allowed(embed):
    small = astronaut().resize((256, 256), Image.LANCZOS)  # the face is about 45 px across

    with pytest.raises(ValueError) as excinfo:
        embed.predict([job(small)])
    assert error_code(excinfo) == "[face_too_small]"

    [output] = embed.predict([job(small, min_face_size=40)])
    assert output["faces_found"] == 1


def test_enrollment_refuses_a_blurred_face_but_not_a_slightly_soft_one(embed):
    blurred = astronaut().filter(ImageFilter.GaussianBlur(2))  # sharpness 10.4, embedding 0.38 away

    with pytest.raises(ValueError) as excinfo:
        embed.predict([job(blurred)])
    assert error_code(excinfo) == "[face_too_blurry]"

    [soft] = embed.predict([job(astronaut().filter(ImageFilter.GaussianBlur(1)))])  # sharpness 31.5
    assert soft["face"]["sharpness"] > DEFAULT_MIN_SHARPNESS
    [allowed] = embed.predict([job(blurred, min_sharpness=5)])
    assert allowed["face"]["sharpness"] < DEFAULT_MIN_SHARPNESS


def test_a_bad_request_in_a_batch_raises(embed):
    # The runtime then reruns the batch one job at a time, so only the bad job fails.
    with pytest.raises(ValueError, match=r"^\[no_face\]"):
        embed.predict([job(astronaut()), job(coffee())])


def test_setup_is_idempotent_and_names_the_resnet_weights(embed, analyzer):
    info = embed.setup()

    assert embed.setup() is info
    assert info.name == "dlib-face-enroller"
    assert info.sha256 == hashlib.sha256(analyzer.resnet_path.read_bytes()).hexdigest()
    assert info.device == "cpu"
    assert {"dlib", "face_recognition_models", "numpy"} <= set(info.libraries)
    assert "tensorflow" not in info.libraries


def test_each_predictor_names_its_registry_model_and_weights(request, analyzer, expression_model):
    fixtures = {"FaceDetectPredictor": "detect", "FaceEmbedPredictor": "embed", "FaceVerifyPredictor": "verify",
                "FaceIdentifyPredictor": "identify", "MemePredictor": "memes"}
    # Every built-in model the service declares is served by one of these classes, under its declared name.
    for model in SERVICE.models:
        predictor = request.getfixturevalue(fixtures[model.predictor.rpartition(":")[2]])
        info = predictor.setup()
        assert (info.name, info.version, info.device) == (model.name, model.version, "cpu")
    detector, meme = request.getfixturevalue("detect").setup(), request.getfixturevalue("memes").setup()
    assert detector.sha256 == hashlib.sha256((analyzer.models_dir / CNN_FILE).read_bytes()).hexdigest()
    assert meme.sha256 == hashlib.sha256(expression_model.weights_path.read_bytes()).hexdigest()
    assert {"tensorflow", "fer"} <= set(meme.libraries)


def test_concurrent_analyses_agree(analyzer, astronaut_faces):
    results = [None, None, None]

    def run(index: int) -> None:
        results[index] = analyzer.analyze(astronaut())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for faces in results:
        assert faces is not None and len(faces) == 1
        assert face_distance(faces[0].embedding, astronaut_faces[0].embedding) < 1e-6


@pytest.mark.parametrize(
    ("predictor", "images", "params", "message"),
    [
        ("detect", 1, {"detector": "mtcnn"}, "detector must be"),
        ("detect", 1, {"landmarks": 7}, "landmarks must be 5 or 68"),
        ("detect", 1, {"expressions": "yes"}, "expressions must be true or false"),
        ("detect", 2, {}, "takes 1 image"),
        ("verify", 1, {}, "takes 2 image"),
        ("verify", 2, {"threshold": 0}, "threshold must be a number greater than 0"),
        ("embed", 1, {"min_face_size": -1}, "min_face_size must be"),
        ("memes", 1, {"top_text": "x" * 201}, "top_text must be text of at most 200"),
        ("memes", 1, {"seed": "one"}, "seed must be an integer"),
    ],
)
def test_bad_parameters_are_refused_with_a_message(request, predictor, images, params, message):
    predictor = request.getfixturevalue(predictor)
    with pytest.raises(ValueError, match=message):
        predictor.predict([job(*[astronaut()] * images, **params)])


# -- expressions and memes ---------------------------------------------------------------------------------


def test_astronaut_is_happy(detect, expression_model):
    [output] = detect.predict([job(astronaut(), expressions=True)])

    [face] = output["faces"]
    expression = face["expression"]
    assert expression["label"] == "happy"
    assert list(expression["scores"]) == list(LABELS)
    assert expression["scores"]["happy"] > 0.9
    assert sum(expression["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    assert expression_model.input_size == (64, 64)
    assert expression_model.weights_path == packaged_weights_path()


def test_expression_batches_match_single_crops(expression_model, astronaut_faces):
    image = astronaut()
    crop = expression_crop(image, astronaut_faces[0].box)
    others = [expression_crop(image, [x, y, 90, 90]) for x, y in ((0, 0), (300, 300), (420, 420))]

    single = expression_model.scores([crop])[0]
    batched = expression_model.scores([*others * 6, crop])  # 19 crops: more than one padded batch

    assert len(batched) == 19
    assert batched[-1] == pytest.approx(single, abs=1e-5)


def test_expression_crop_pads_faces_at_the_border(astronaut_faces):
    x, y, w, h = astronaut_faces[0].box
    corner = astronaut().crop((x - 5, y - 5, x + w + 40, y + h + 40))  # the face touches the top-left corner

    crop = expression_crop(corner, [5, 5, w, h])

    assert crop.mode == "L" and crop.width == crop.height > w


def test_meme_is_a_png_of_the_same_size_with_a_happy_caption(astronaut_meme):
    image = Image.open(io.BytesIO(astronaut_meme["image_png"]))

    assert image.format == "PNG"
    assert image.size == astronaut().size
    difference = np.asarray(ImageChops.difference(image.convert("RGB"), astronaut()))
    assert (difference.max(axis=2) > 64).mean() > 0.02  # the text covers a visible share of the photo
    assert astronaut_meme["expression"]["label"] == "happy"
    caption = astronaut_meme["caption"]
    assert (caption["top"], caption["bottom"]) in CAPTIONS["happy"]
    assert (caption["top"], caption["bottom"]) == pick_caption("happy", 1)
    assert near(centre(astronaut_meme["face"]), ASTRONAUT_FACE_CENTRE)


def test_meme_caption_is_deterministic_for_a_seed(memes, astronaut_meme):
    [again] = memes.predict([job(astronaut(), seed=1)])

    assert again["caption"] == astronaut_meme["caption"]
    assert again["image_png"] == astronaut_meme["image_png"]
    seeds = {pick_caption("happy", seed) for seed in range(20)}
    assert len(seeds) > 1  # the seed does choose


def test_meme_overrides_are_honoured(memes, astronaut_meme):
    [output] = memes.predict([job(astronaut(), seed=1, top_text="Houston", bottom_text=None)])

    assert output["caption"] == {"top": "Houston", "bottom": astronaut_meme["caption"]["bottom"]}
    assert output["image_png"] != astronaut_meme["image_png"]


def test_meme_needs_a_face(memes):
    with pytest.raises(ValueError, match=r"^\[no_face\] "):
        memes.predict([job(coffee())])


def test_captions_cover_every_expression():
    assert set(CAPTIONS) == set(LABELS)
    for expression, captions in CAPTIONS.items():
        assert len(captions) >= 3, expression
        assert pick_caption(expression, 7) == pick_caption(expression, 7)
    with pytest.raises(ValueError):
        pick_caption("bored", 0)


def test_render_meme_fits_long_text_and_keeps_the_size():
    photo = coffee()
    meme = render_meme(photo, "word " * 40, "x" * 200)

    assert meme.size == photo.size and meme.mode == "RGB"
    rows = np.asarray(ImageChops.difference(meme, photo).convert("L")).max(axis=1) > 64
    # Text at the top and the bottom, the middle of the photo untouched.
    assert rows[: photo.height // 3].any() and rows[-photo.height // 3:].any()
    assert not rows[int(photo.height * 0.4): int(photo.height * 0.6)].any()
