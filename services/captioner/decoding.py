"""Batched beam search (greedy is beam width 1) over a `CaptionDecoder`.

Every beam of every image advances in one decoder call per step: the rows are image-major, `k` per image
(k the largest beam width asked for); an image asking for fewer beams leaves the rest of its rows dead
(score -inf). Each image keeps its own settings (`DecodingOptions`).

At each step an image's k live beams are extended by every word; of the 2k best extensions (by the sum of
the model's log-probabilities) an `endseq` among the first k finishes a hypothesis, the others become the
next live beams, k of them (as Hugging Face's beam search does). A hypothesis's score is its log-probability
divided by n ** length_penalty, n its tokens counting `endseq` (words + 1, so never 0): length_penalty 0
ranks by log-probability alone, 1 by log-probability per token, higher favours longer captions still. An
image is done when it has k finished hypotheses and no live beam can still beat the worst of them; at
`max_words` words every live beam is made to finish. Beam width 1 is greedy decoding: the first `endseq`
ends it (the length penalty then changes nothing). Beams are distinct prefixes, so the hypotheses are
distinct word sequences.

The reported `log_prob` is the model's own (the unmasked softmax's) log-probability of the words and
`endseq`: the constraints (min_words, no_repeat_ngram_size, no <unk>) choose among extensions but never
renormalise the distribution.
"""

import math
from dataclasses import dataclass

import torch

from services.captioner.model import END, PAD, START, UNKNOWN, CaptionDecoder

# Never generated: padding, a second startseq, an unknown word.
NEVER_GENERATED = (PAD, START, UNKNOWN)


@dataclass(frozen=True)
class DecodingOptions:
    beam_width: int = 3
    num_captions: int = 1
    max_words: int = 20
    min_words: int = 1
    length_penalty: float = 0.0
    no_repeat_ngram_size: int = 0


@dataclass(frozen=True)
class Hypothesis:
    ids: tuple[int, ...]  # the words, without startseq and endseq
    log_prob: float
    score: float


def length_penalty(tokens: int, alpha: float) -> float:
    """tokens ** alpha (tokens counting endseq); 1 when alpha is 0."""
    return tokens ** alpha


def banned_by_ngrams(sequence: list[int], n: int) -> set[int]:
    """The tokens that would repeat an n-gram already in `sequence` (startseq included)."""
    if n <= 0 or len(sequence) < n:
        return set()
    prefix = tuple(sequence[len(sequence) - n + 1:])
    return {sequence[i + n - 1] for i in range(len(sequence) - n + 1) if tuple(sequence[i:i + n - 1]) == prefix}


def beam_search(decoder: CaptionDecoder, features: torch.Tensor, options: list[DecodingOptions]
                ) -> list[list[Hypothesis]]:
    """(N, F) image features and one `DecodingOptions` per image -> each image's best `num_captions`
    hypotheses, best first. Runs on the features' device (under the caller's autocast, if any)."""
    n = features.shape[0]
    if n != len(options):
        raise ValueError(f"{n} images but {len(options)} decoding options")
    if n == 0:
        return []
    k = max(o.beam_width for o in options)
    device = features.device
    context, state = decoder.start(features)
    rows = torch.arange(n, device=device).repeat_interleave(k)
    context, state = context[rows], (state[0][:, rows], state[1][:, rows])
    vocabulary_size = decoder.config.vocabulary_size

    # Per-image masks, built once: which rows are each image's, and its limits.
    min_words = torch.tensor([o.min_words for o in options], device=device).repeat_interleave(k)
    max_words = torch.tensor([o.max_words for o in options], device=device).repeat_interleave(k)
    scores = torch.full((n, k), -math.inf, device=device)
    scores[:, 0] = 0.0  # one live beam per image to start with: the others would duplicate it
    sequences: list[list[int]] = [[START] for _ in range(n * k)]
    last = torch.full((n * k,), START, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]
    done = [False] * n
    blocks_ngrams = any(o.no_repeat_ngram_size for o in options)

    for words in range(max(o.max_words for o in options) + 1):  # `words` generated so far per live beam
        # 1. One decoder call for every row
        log_probs, state = decoder.step(last, state, context)
        log_probs = log_probs.float()

        # 2. Constraints: never <pad>/startseq/<unk>; no endseq before min_words; only endseq at max_words;
        # no repeated n-grams
        log_probs[:, list(NEVER_GENERATED)] = -math.inf
        log_probs[:, END] = torch.where(min_words > words, -math.inf, log_probs[:, END])
        at_limit = max_words <= words
        if bool(at_limit.any()):
            only_end = torch.full_like(log_probs, -math.inf)
            only_end[:, END] = log_probs[:, END]
            log_probs = torch.where(at_limit[:, None], only_end, log_probs)
        if blocks_ngrams:
            live = torch.isfinite(scores.view(-1)).tolist()
            for row, sequence in enumerate(sequences):
                banned = banned_by_ngrams(sequence, options[row // k].no_repeat_ngram_size) if live[row] else set()
                if banned:
                    log_probs[row, list(banned)] = -math.inf

        # 3. The 2k best extensions of each image's beams
        candidates = (scores.view(-1, 1) + log_probs).view(n, k * vocabulary_size)
        top = candidates.topk(min(2 * k, k * vocabulary_size), dim=1)
        top_scores, top_indices = top.values.cpu().tolist(), top.indices.cpu().tolist()

        # 4. Finish hypotheses and choose the next live beams, image by image
        new_scores = torch.full((n, k), -math.inf)
        sources = torch.arange(n * k)
        new_last = torch.full((n * k,), END, dtype=torch.long)
        new_sequences = [[START] for _ in range(n * k)]
        for i, o in enumerate(options):
            if done[i]:
                continue
            alive = 0
            for rank, (value, index) in enumerate(zip(top_scores[i], top_indices[i], strict=True)):
                if value == -math.inf or alive == o.beam_width:
                    break
                beam, token = divmod(index, vocabulary_size)
                row = i * k + beam
                if token == END:
                    if rank < o.beam_width:
                        ids = tuple(sequences[row][1:])
                        finished[i].append(Hypothesis(ids, value, value / length_penalty(len(ids) + 1,
                                                                                         o.length_penalty)))
                    continue
                target = i * k + alive
                new_scores[i, alive] = value
                sources[target] = row
                new_last[target] = token
                new_sequences[target] = [*sequences[row], token]
                alive += 1
            finished[i] = sorted(finished[i], key=lambda h: -h.score)[:o.beam_width]
            greedy_done = o.beam_width == 1 and bool(finished[i])
            done[i] = alive == 0 or greedy_done or (len(finished[i]) >= o.beam_width and not can_improve(
                float(new_scores[i].max()), words + 1, o, finished[i][-1].score))
        if all(done):
            break

        # 5. Reorder the decoder state to the chosen beams
        sources = sources.to(device)
        state = (state[0][:, sources], state[1][:, sources])
        context = context[sources]
        scores = new_scores.to(device)
        last = new_last.to(device)
        sequences = new_sequences

    return [hypotheses[:o.num_captions] for hypotheses, o in zip(finished, options, strict=True)]


def can_improve(best_alive: float, words: int, options: DecodingOptions, worst_finished: float) -> bool:
    """Whether a live beam with log-probability `best_alive` after `words` words could still finish with a
    better score than `worst_finished`. Log-probabilities only fall as words are added; the penalty's
    denominator grows with length when length_penalty > 0 (best case: the longest caption allowed) and
    shrinks when < 0 (best case: finishing now)."""
    tokens = options.max_words + 1 if options.length_penalty > 0 else words + 1
    return best_alive / length_penalty(tokens, options.length_penalty) > worst_finished
