"""One cycle's update of the Whisper-based policy: RLHF on an encoder-decoder, token by token.

    rollout = collect_whisper_rollout(policy, items, ppo_config, generator)   # pi_old == pi_ref
    report = ppo_update(policy, ..., rollout, ..., minibatch_loss=whisper_minibatch_loss)

The recipe of RLHF on a language model, conditioned on audio (design.md, "The learning signal"):
each feedback item's group of candidate transcripts is K samples from the decoder (temperature),
the greedy transcript (what the server shows), the user's text (a correction, an acceptance's shown
text, a chosen alternative) and the texts the item names (a choice's n-best, a rejection's shown
transcript). Each candidate's reward is the item's (rewards.py) on its normalized text, its advantage
the reward minus the group's mean. The loss per minibatch is PPO's clipped ratio on the candidates'
token log-probs, the exact per-token KL to the frozen reference (full distributions over the
vocabulary, on the candidates' positions) with the adaptive coefficient, an entropy bonus, and the
ptx terms: cross-entropy on the user's text (objective sft, ppo+sft), on replayed base-corpus
sentences, and CTC on the user's text for the first pass's head.

What trains: the decoder's layers, except the cross-attention key/value projections, and the CTC
head. The encoder, the token and position embeddings and the cross-attention keys/values stay the
serving version's, so each item's encoder pass and cross keys/values are computed once per cycle
(whisper_model.py's splice, exactly as the server's second pass computes them) and every update
step runs the decoder only. Whisper writes cased, punctuated text; the user's normalized text is
given the sentence shape Whisper writes (capital first letter, a final period) before it is
tokenized, so supervised terms teach words, not a new style.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from ..core.speech_span import speech_span
from ..core.text import normalize_text
from .config import PPOConfig
from .distributed import SINGLE, DataParallel
from .ppo import clipped_policy_loss, entropy, group_advantages, kl_to_reference, masked_mean
from .rewards import FeedbackItem
from .tokenizer import encode_targets, make_tokenizer
from .update import Rollout, UpdateAborted
from .whisper_ct2 import END_OF_TEXT, FIRST_TIMESTAMP, NO_TIMESTAMPS, START_OF_TRANSCRIPT
from .whisper_head import streamed_states
from .whisper_model import SAMPLE_RATE_HZ, WhisperPolicy, cross_key_values, decoder_states

log = logging.getLogger(__name__)

PROMPT = (START_OF_TRANSCRIPT, NO_TIMESTAMPS)
MIN_NEW_TOKENS = 8
TOKENS_PER_SECOND = 12.0
"""Most tokens a sampled transcript may have per second of audio (speech is ~3-5): a loop breaker."""


def whisper_style(text: str) -> str:
    """Normalized text in the shape Whisper writes a sentence: " The meeting starts at nine." """
    return f" {text[:1].upper()}{text[1:]}." if text else ""


def freeze_for_online_training(policy: WhisperPolicy) -> WhisperPolicy:
    """requires_grad only where the online update trains (the module docstring says why)."""
    policy.requires_grad_(False)
    for layer in policy.model.model.decoder.layers:
        layer.requires_grad_(True)
        layer.encoder_attn.k_proj.requires_grad_(False)
        layer.encoder_attn.v_proj.requires_grad_(False)
    policy.model.model.decoder.layer_norm.requires_grad_(True)
    policy.ctc_head.requires_grad_(True)
    return policy


class Tokenizer:
    """Whisper's tokenizer (tokenizers' fast BPE) and text <-> token conversions of the update."""

    def __init__(self, tokenizer_json):
        from tokenizers import Tokenizer as FastTokenizer

        self._tokenizer = FastTokenizer.from_file(str(tokenizer_json))

    def encode(self, text: str) -> list[int]:
        """Whisper-style text -> tokens ending with end-of-text."""
        return [*self._tokenizer.encode(text, add_special_tokens=False).ids, END_OF_TEXT]

    def pieces(self, word: str) -> int:
        """Tokens Whisper spells `word` with, as a word of running text (a leading space)."""
        return len(self._tokenizer.encode(" " + word, add_special_tokens=False).ids)

    def normalized(self, tokens: Sequence[int]) -> str:
        return normalize_text(self._tokenizer.decode([t for t in tokens if t < END_OF_TEXT]))


@dataclass
class EncodedAudio:
    """One utterance's second-pass inputs, under the serving (frozen) encoder."""

    cross_k: torch.Tensor
    """(L, 1, heads, T, hd): cross-attention keys of its T speech (+ pad) frames; the padding tail is shared."""
    cross_v: torch.Tensor
    seconds: float


class WhisperEncodings:
    """Encoder passes of a cycle, cached: the encoder is frozen, so an utterance's never changes."""

    def __init__(self, policy: WhisperPolicy):
        self.policy = policy
        with torch.no_grad():
            self.silence_states = policy.silence_states()  # (1, 1500, D)
            self.silence_k, self.silence_v = cross_key_values(policy.model, self.silence_states)
        self._cache: dict[int, EncodedAudio] = {}

    @torch.no_grad()
    def of(self, key: int, samples: np.ndarray) -> EncodedAudio:
        if key not in self._cache:
            samples = np.asarray(samples, dtype=np.float32)
            settings = self.policy.settings
            if settings.trim_margin_s is not None:  # encoded as the server's second pass encodes it
                start, end = speech_span(samples, margin_s=settings.trim_margin_s,
                                         below_peak_db=settings.trim_below_peak_db)
                samples = samples[start:end]
            audio = torch.from_numpy(samples)
            frames = int(self.policy.padded_lengths(torch.tensor([len(audio)]))[0]) // 320
            states = self.policy.final_encoder_states(audio[None], torch.tensor([len(audio)]),
                                                      self.silence_states)[:, :frames]
            cross_k, cross_v = cross_key_values(self.policy.model, states)
            self._cache[key] = EncodedAudio(cross_k, cross_v, len(audio) / SAMPLE_RATE_HZ)
        return self._cache[key]

    def full(self, encoded: Sequence[EncodedAudio]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (L, B, heads, 1500, hd) keys and values: each utterance's frames, then the padding tail."""
        keys, values = [], []
        for e in encoded:
            frames = e.cross_k.shape[3]
            keys.append(torch.cat([e.cross_k, self.silence_k[:, :, :, frames:]], dim=3))
            values.append(torch.cat([e.cross_v, self.silence_v[:, :, :, frames:]], dim=3))
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)


def _embed(policy: WhisperPolicy, tokens: torch.Tensor) -> torch.Tensor:
    return policy.model.model.decoder.embed_tokens(tokens)


def _logits(policy: WhisperPolicy, states: torch.Tensor) -> torch.Tensor:
    return states @ policy.model.model.decoder.embed_tokens.weight.t()  # tied output projection


def _suppressed(policy: WhisperPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    generation = policy.model.generation_config
    return (torch.tensor(sorted(set(generation.suppress_tokens or ())), dtype=torch.long),
            torch.tensor(sorted(set(generation.begin_suppress_tokens or ())), dtype=torch.long))


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits (R, V), drawn from softmax(logits / temperature) by inverting its cumulative
    sum at a uniform draw: the distribution of torch.multinomial at a tenth of its cost over Whisper's 51,864
    tokens (multinomial draws an exponential per token). A token of probability 0 is never drawn: the sum
    does not rise at it, and the draw is above 0."""
    cdf = torch.softmax(logits / temperature, -1).cumsum(-1)  # (R, V)
    draw = (1.0 - torch.rand(len(logits), 1, generator=generator)) * cdf[:, -1:]  # in (0, total]
    return torch.searchsorted(cdf, draw)[:, 0].clamp(max=logits.shape[-1] - 1)


@torch.no_grad()
def generate(policy: WhisperPolicy, cross_k: torch.Tensor, cross_v: torch.Tensor, greedy: Sequence[bool],
             max_tokens: Sequence[int], generator: torch.Generator | None, temperature: float,
             audio_rows: Sequence[int] | None = None) -> list[list[int]]:
    """One transcript per row (tokens ending with end-of-text when finished): the rows decode the audios
    whose cross keys and values are given (L, A, heads, 1500, hd), audio a the next audio_rows[a] rows (None:
    one row each) -- several utterances decode in one batch --, each row greedy or sampled at
    `temperature`, and cut at its own `max_tokens`. An audio whose rows are all finished leaves the batch.
    Whisper's token filters apply (suppressed tokens, no timestamps, no blank or end-of-text first)."""
    suppress, begin_suppress = _suppressed(policy)
    layers, audios, heads, _, head_dim = cross_k.shape
    counts = list(audio_rows) if audio_rows is not None else [1] * audios
    rows = sum(counts)
    owner = [a for a, count in enumerate(counts) for _ in range(count)]  # the audio of each row
    empty = torch.zeros(layers, rows, heads, 0, head_dim)
    states, self_k, self_v, _ = decoder_states(policy.model, _embed(policy, torch.tensor([PROMPT] * rows)),
                                               empty, empty, cross_k, cross_v, audio_rows=counts)
    logits = _logits(policy, states[:, -1])  # (R, V)
    greedy_rows = torch.tensor(list(greedy), dtype=torch.bool)
    budgets = list(max_tokens)
    sequences: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    live = list(range(rows))  # the rows still in the batch, in batch order
    present = list(range(audios))  # the audios still in the batch (cross_k's second axis), in batch order
    for step in range(max(budgets)):
        logits[:, suppress] = -math.inf
        logits[:, FIRST_TIMESTAMP:] = -math.inf
        if step == 0:
            logits[:, begin_suppress] = -math.inf
        tokens = torch.where(greedy_rows[live], logits.argmax(-1), sample_tokens(logits, temperature, generator))
        for i, token in zip(live, tokens.tolist(), strict=True):
            if not done[i]:
                sequences[i].append(token)
                done[i] = token == END_OF_TEXT or len(sequences[i]) >= budgets[i]
        if all(done):
            break
        finished = {a for a in present if all(done[i] for i in live if owner[i] == a)}
        if finished:  # the finished audios leave the batch with their rows, caches and keys/values
            kept_rows = [j for j, i in enumerate(live) if owner[i] not in finished]
            kept_audios = [position for position, a in enumerate(present) if a not in finished]
            live, present = [live[j] for j in kept_rows], [present[p] for p in kept_audios]
            index = torch.tensor(kept_rows)
            self_k, self_v, tokens = self_k[:, index], self_v[:, index], tokens[index]
            cross_k, cross_v = cross_k[:, kept_audios], cross_v[:, kept_audios]
            counts = [counts[p] for p in kept_audios]
        states, self_k, self_v, _ = decoder_states(policy.model, _embed(policy, tokens[:, None]), self_k, self_v,
                                                   cross_k, cross_v, audio_rows=counts)
        logits = _logits(policy, states[:, -1])
    return sequences


def _token_batch(candidates: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + each candidate, padded: input tokens (B, P + N - 1) and the mask of candidate positions (B, N)."""
    width = max(len(c) for c in candidates)
    tokens = torch.full((len(candidates), len(PROMPT) + width - 1), END_OF_TEXT, dtype=torch.long)
    mask = torch.zeros(len(candidates), width, dtype=torch.bool)
    for i, c in enumerate(candidates):
        sequence = [*PROMPT, *c][:-1]  # the last candidate token is predicted, never fed
        tokens[i, : len(sequence)] = torch.tensor(sequence)
        mask[i, : len(c)] = True
    return tokens, mask


def candidate_states(policy: WhisperPolicy, cross_k: torch.Tensor, cross_v: torch.Tensor,
                     candidates: Sequence[Sequence[int]], audio_rows: Sequence[int] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced decoder pass over candidates (B sequences) on their utterances' keys/values (L, A, ...): one
    utterance each (A = B) or, with `audio_rows`, utterance a for the next audio_rows[a] candidates -> (the
    decoder's output states (M, D) at the M candidate positions -- the mask's True entries, row by row --,
    mask (B, N))."""
    tokens, mask = _token_batch(candidates)
    layers, _, heads, _, head_dim = cross_k.shape
    empty = torch.zeros(layers, len(candidates), heads, 0, head_dim)
    states, _, _, _ = decoder_states(policy.model, _embed(policy, tokens), empty, empty, cross_k, cross_v,
                                     audio_rows=audio_rows)
    return states[:, len(PROMPT) - 1 :][mask], mask  # (M, D): the states that predict the candidates' tokens


def token_log_probs(policy: WhisperPolicy, positions: torch.Tensor, candidates: Sequence[Sequence[int]],
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """candidate_states' output -> (full log-probs (M, V), the candidates' token log-probs (B, N), 0 past each end).

    Only the candidates' own positions go through the output projection and the softmax: a padding position
    would cost as much as a token (51,864 logits, and their gradient), and the batch pads every candidate to
    the longest (a sample that loops runs to its token budget)."""
    log_probs = torch.log_softmax(_logits(policy, positions).float(), dim=-1)  # (M, V)
    targets = torch.tensor([token for c in candidates for token in c], dtype=torch.long)  # (M,), in mask order
    chosen = log_probs.gather(-1, targets[:, None])[:, 0]  # (M,)
    return log_probs, torch.zeros(mask.shape, dtype=chosen.dtype).masked_scatter(mask, chosen)


def candidate_log_probs(policy: WhisperPolicy, cross_k: torch.Tensor, cross_v: torch.Tensor,
                        candidates: Sequence[Sequence[int]], audio_rows: Sequence[int] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """candidate_states then token_log_probs: (full log-probs (M, V) at the M candidate positions, the
    candidates' token log-probs (B, N) (0 past each end), mask (B, N))."""
    positions, mask = candidate_states(policy, cross_k, cross_v, candidates, audio_rows)
    log_probs, chosen = token_log_probs(policy, positions, candidates, mask)
    return log_probs, chosen, mask


@dataclass
class WhisperItemRollout:
    """One feedback item's group, computed once under pi_old."""

    item: FeedbackItem
    encoded: EncodedAudio
    candidates: list[list[int]]
    """Token sequences (each ending with end-of-text): K samples, the greedy one, then the texts the item names."""
    old_log_probs: torch.Tensor
    """(K', N) per-token log-probs under pi_old (0 past each candidate's end)."""
    rewards: torch.Tensor
    advantages: torch.Tensor
    sampled: int
    target: list[int] | None
    """The user's text as tokens (the supervised target), None without one."""
    ctc_states: torch.Tensor | None
    """(T, L + 1, D) the first pass's streamed encoder states (for the CTC head's loss), with a target only."""
    ctc_target: list[int] | None
    reference_states: list[torch.Tensor]
    """Per candidate (its length, D): the frozen reference's decoder output states at its positions, computed once
    in the rollout (where the policy still is the reference), so the update's exact KL runs the reference's
    output projection only, not its decoder, at every step."""


class WhisperRolloutContext:
    """What the rollout and the loss share in a cycle: the frozen reference, encodings, tokenizers."""

    def __init__(self, policy: WhisperPolicy, tokenizer_json):
        freeze_for_online_training(policy)
        self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        self.encodings = WhisperEncodings(self.reference)
        self.tokenizer = Tokenizer(tokenizer_json)
        self.ctc_tokenizer = make_tokenizer(list(policy.settings.ctc_vocabulary))


def _max_tokens(seconds: float) -> int:
    return max(MIN_NEW_TOKENS, int(seconds * TOKENS_PER_SECOND))


ITEMS_PER_GENERATION = 16
"""Feedback items whose candidate rows are sampled in one decoder batch: each step's output projection
reads the 80 MB token embedding once for all their rows, and each item's cross keys/values (18 MB) are
read once for its rows."""


def _generate_groups(policy: WhisperPolicy, context: WhisperRolloutContext, items: Sequence[FeedbackItem],
                     samples: int, with_greedy: bool, generator: torch.Generator,
                     temperature: float) -> list[list[list[int]]]:
    """Per item: `samples` sampled transcripts, then (with_greedy) the greedy one; items batched in groups."""
    per_item = samples + int(with_greedy)
    out: list[list[list[int]]] = []
    for first in range(0, len(items), ITEMS_PER_GENERATION):
        group = items[first : first + ITEMS_PER_GENERATION]
        encoded = [context.encodings.of(item.feedback_id, item.samples) for item in group]
        cross_k, cross_v = context.encodings.full(encoded)
        greedy = ([False] * samples + [True] * int(with_greedy)) * len(group)
        budgets = [_max_tokens(e.seconds) for e in encoded for _ in range(per_item)]
        rows = generate(policy, cross_k, cross_v, greedy, budgets, generator, temperature,
                        audio_rows=[per_item] * len(group))
        out += [rows[i * per_item : (i + 1) * per_item] for i in range(len(group))]
    return out


@torch.no_grad()
def collect_whisper_rollout(policy: WhisperPolicy, items: Sequence[FeedbackItem], config: PPOConfig,
                            generator: torch.Generator, context: WhisperRolloutContext) -> Rollout:
    """Candidates, rewards and group advantages of every item under the current policy (pi_old)."""
    policy.eval()
    out: list[WhisperItemRollout] = []
    generated = _generate_groups(policy, context, items, config.samples_per_utterance, config.include_greedy,
                                 generator, config.sampling_temperature)
    # At a cycle's start the policy is the reference: its states are the reference's (checked, not assumed).
    is_reference = all(torch.equal(a, b) for a, b in zip(policy.parameters(), context.reference.parameters(),
                                                          strict=True))
    for item, candidates in zip(items, generated, strict=True):
        encoded = context.encodings.of(item.feedback_id, item.samples)
        cross_k, cross_v = context.encodings.full([encoded])
        target = context.tokenizer.encode(whisper_style(item.target)) if item.target else None
        named = [t for t in (item.target, *item.alternatives) if t]
        for text in dict.fromkeys(named):
            if text != item.target or config.include_target_alignment:
                candidates.append(context.tokenizer.encode(whisper_style(text)))
        candidates = [c for c in candidates if c]
        positions, mask = candidate_states(policy, cross_k, cross_v, candidates, audio_rows=[len(candidates)])
        _, old = token_log_probs(policy, positions, candidates, mask)
        rewards = torch.tensor([item.reward(context.tokenizer.normalized(c), config.reward_unit) for c in candidates])
        advantages = group_advantages(rewards[None], torch.ones(1, len(rewards), dtype=torch.bool),
                                      config.normalize_advantages)[0]
        ctc_states = ctc_target = None
        if item.target and config.uses_targets and config.head_ctc_coef > 0:
            try:
                ctc_target = encode_targets(context.ctc_tokenizer, item.target)
                ctc_states = streamed_states(context.reference, np.asarray(item.samples, np.float32), 32)
            except ValueError as e:
                log.warning("feedback %d: no CTC target for the first pass (%s)", item.feedback_id, e)
        reference = positions if is_reference else \
            candidate_states(context.reference, cross_k, cross_v, candidates, audio_rows=[len(candidates)])[0]
        out.append(WhisperItemRollout(item, encoded, candidates, old * mask, rewards, advantages,
                                      config.samples_per_utterance, target, ctc_states, ctc_target,
                                      list(reference.split([len(c) for c in candidates]))))
    all_rewards = torch.cat([r.rewards for r in out]) if out else torch.zeros(0)
    sampled = torch.cat([r.rewards[: r.sampled] for r in out]) if out else torch.zeros(0)
    greedy = [float(r.rewards[r.sampled]) for r in out if config.include_greedy]

    def mean(values) -> float:
        return float(torch.as_tensor(values, dtype=torch.float).mean()) if len(values) else math.nan

    std = float(all_rewards.std(unbiased=False)) if len(all_rewards) else math.nan
    return Rollout(out, mean(all_rewards), std, mean(sampled), mean(greedy))


def _ctc_head_loss(policy: WhisperPolicy, batch: Sequence[WhisperItemRollout]) -> torch.Tensor | None:
    usable = [r for r in batch if r.ctc_states is not None and r.ctc_target]
    if not usable:
        return None
    states = torch.nn.utils.rnn.pad_sequence([r.ctc_states.float() for r in usable], batch_first=True)
    log_probs = policy.ctc_head(states.transpose(1, 2)).transpose(0, 1)  # (T, B, V)
    return F.ctc_loss(log_probs, torch.cat([torch.tensor(r.ctc_target) for r in usable]),
                      torch.tensor([len(r.ctc_states) for r in usable]),
                      torch.tensor([len(r.ctc_target) for r in usable]), blank=0, zero_infinity=True)


def _cross_entropy(policy: WhisperPolicy, context: WhisperRolloutContext, encoded: Sequence[EncodedAudio],
                   targets: Sequence[list[int]]) -> torch.Tensor:
    cross_k, cross_v = context.encodings.full(encoded)
    _, chosen, mask = candidate_log_probs(policy, cross_k, cross_v, targets)
    return -masked_mean(chosen, mask)


def _row_of(candidates: Sequence[list[int]], tokens: list[int]) -> int | None:
    """The last of `candidates` equal to `tokens` (an identical row scores identically), None if none is."""
    return next((k for k in range(len(candidates) - 1, -1, -1) if candidates[k] == tokens), None)


def whisper_minibatch_gradients(policy: WhisperPolicy, batch: Sequence[WhisperItemRollout], drawn: list | None,
                                kl_coef: float, config: PPOConfig, scale: float, *,
                                context: WhisperRolloutContext) -> dict[str, float]:
    """Stages 1-3 of update.ppo_update for one minibatch of Whisper groups (update.MinibatchGradients).

    The candidates run through the decoder `rows_per_forward` at a time, each chunk's share of the
    minibatch's token-mean loss back-propagated before the next, so memory stays bounded. The user's
    text is one of its item's candidates (include_target_alignment): its cross-entropy (sft_loss) is
    then read off the candidates' forward, not computed by a forward of its own."""
    rows = [(r, k) for r in batch for k in range(len(r.candidates))]
    total_tokens = sum(len(r.candidates[k]) for r, k in rows)
    sums: dict[str, float] = {}
    with_target = [r for r in batch if r.target] if config.uses_targets else []
    target_rows = {id(r): _row_of(r.candidates, r.target) for r in with_target}
    folds_sft = bool(with_target) and None not in target_rows.values()
    target_tokens = sum(len(r.target) for r in with_target)
    for first in range(0, len(rows), config.rows_per_forward):
        chunk = rows[first : first + config.rows_per_forward]
        candidates = [r.candidates[k] for r, k in chunk]
        # 1. forward (teacher forcing) under pi_theta and the frozen reference
        # each item's keys/values once, for its consecutive rows
        groups = [list(rows_of_item) for _, rows_of_item in itertools.groupby(chunk, key=lambda row: id(row[0]))]
        cross_k, cross_v = context.encodings.full([group[0][0].encoded for group in groups])
        audio_rows = [len(group) for group in groups]
        log_probs, new, mask = candidate_log_probs(policy, cross_k, cross_v, candidates, audio_rows)  # (M, V), (R, N)
        with torch.no_grad():  # the reference's decoder states were computed in the rollout
            ref_positions = torch.cat([r.reference_states[k] for r, k in chunk])  # (M, D), in mask order
            ref_log_probs, _ = token_log_probs(context.reference, ref_positions, candidates, mask)
        share = float(mask.sum()) / total_tokens
        # 2. PPO terms: clipped ratio per token, exact per-token KL to the reference, entropy bonus
        kl = kl_to_reference(log_probs, ref_log_probs).mean()  # over the chunk's M candidate tokens
        ent = entropy(log_probs).mean()
        figures = {"kl": float(kl.detach()), "entropy": float(ent.detach())}
        loss = torch.zeros(())
        if config.uses_rewards:
            old = torch.stack([F.pad(r.old_log_probs[k], (0, mask.shape[1] - r.old_log_probs.shape[1]))[: mask.shape[1]]
                               for r, k in chunk])
            advantages = torch.stack([r.advantages[k] for r, k in chunk])
            policy_loss = clipped_policy_loss(new[None], old[None], advantages[None], mask[None], config.clip_range)
            loss = loss + (policy_loss.loss + kl_coef * kl - config.entropy_coef * ent) * share
            figures.update(policy_loss=float(policy_loss.loss.detach()),
                           clip_fraction=float(policy_loss.clip_fraction), approx_kl=float(policy_loss.approx_kl))
        targets_here = [j for j, (r, k) in enumerate(chunk) if target_rows.get(id(r)) == k] if folds_sft else []
        if targets_here:  # this chunk's share of the token-mean cross-entropy on the users' texts (ptx)
            sft_part = -new[targets_here].sum() / target_tokens  # new is 0 past each candidate's end
            loss = loss + config.sft_coef * sft_part
            sums["sft_loss"] = sums.get("sft_loss", 0.0) + float(sft_part.detach())
        if loss.requires_grad:
            (loss * scale).backward()
        for name, value in figures.items():
            sums[name] = sums.get(name, 0.0) + value * share
    # 3. supervised (ptx) terms, each back-propagated on its own
    ptx_terms = []
    if with_target and not folds_sft:
        ptx_terms.append(("sft_loss", config.sft_coef, lambda: _cross_entropy(
            policy, context, [r.encoded for r in with_target], [r.target for r in with_target])))
    if drawn:
        ptx_terms.append(("replay_loss", config.replay_coef, lambda: _cross_entropy(
            policy, context, [e for e, _ in drawn], [t for _, t in drawn])))
    if config.uses_targets and config.head_ctc_coef > 0:
        ptx_terms.append(("head_ctc_loss", config.head_ctc_coef, lambda: _ctc_head_loss(policy, batch)))
    ptx = config.sft_coef * sums["sft_loss"] if folds_sft else 0.0
    for name, coef, term in ptx_terms:
        value = term()
        if value is None:
            continue
        (coef * value * scale).backward()
        sums[name] = float(value.detach())
        ptx += coef * float(value.detach())
    sums["ptx_loss"] = ptx
    ppo_loss = sums.get("policy_loss", 0.0) + kl_coef * sums["kl"] - config.entropy_coef * sums["entropy"]
    sums["loss"] = (ppo_loss if config.uses_rewards else 0.0) + ptx
    return sums


@dataclass
class RehearsalReport:
    """What a cycle's rehearsal did (stats["rehearsal"] of its record)."""

    feedback_ids: list[int]
    """The items rehearsed, in step order."""
    steps: int = 0
    sft_loss: float = math.nan
    """Mean cross-entropy (nats per token) on the rehearsed texts over the steps, as they were taken."""

    def as_dict(self) -> dict:
        return {"items": len(self.feedback_ids), "steps": self.steps, "sft_loss": self.sft_loss}


def whisper_rehearsal(policy: WhisperPolicy, optimizer: torch.optim.Optimizer, items: Sequence[FeedbackItem],
                      config: PPOConfig, context: WhisperRolloutContext, replay, rng: random.Random, *,
                      should_stop=lambda: False, data_parallel: DataParallel = SINGLE) -> RehearsalReport:
    """Supervised steps on items with a text -- earlier cycles' and this one's -- after the cycle's update.

    One pass at most over `items` in shuffled minibatches of `minibatch_size`, at most `rehearsal_steps` of
    them; each step follows the cross-entropy on its texts (sft_coef) plus that on `replay_per_minibatch`
    base-corpus utterances (replay_coef), as the update's ptx terms do, and the KL to the reference on those
    (rehearsal_kl_coef; _replay_loss). The first pass's CTC head is not
    rehearsed (its states cost a streamed encoder pass per item). Under data parallelism the main process
    computes each step and the others add zero gradients (every process walks the same steps)."""
    pool = [item for item in items if item.target]
    rng.shuffle(pool)
    steps = min(config.rehearsal_steps, math.ceil(len(pool) / config.minibatch_size))
    report = RehearsalReport([item.feedback_id for item in pool[: steps * config.minibatch_size]])
    losses = []
    update_rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = config.rehearsal_learning_rate
    try:
        for step in range(steps):
            if should_stop():
                raise UpdateAborted(f"stopped at rehearsal step {step}")
            batch = pool[step * config.minibatch_size : (step + 1) * config.minibatch_size]
            loss = _rehearsal_step(policy, optimizer, batch, config, context, replay, rng, data_parallel)
            losses += [loss] if loss is not None else []
            report.steps += 1
    finally:  # the next cycle's update steps at its own rate
        for group, rate in zip(optimizer.param_groups, update_rates, strict=True):
            group["lr"] = rate
    if losses:
        report.sft_loss = round(float(np.mean(losses)), 4)
    log.info("rehearsal: %d steps on %d of %d items with a text; cross-entropy %.3f", report.steps,
             len(report.feedback_ids), len(pool), report.sft_loss)
    return report


def _rehearsal_step(policy: WhisperPolicy, optimizer: torch.optim.Optimizer, batch: Sequence[FeedbackItem],
                    config: PPOConfig, context: WhisperRolloutContext, replay, rng: random.Random,
                    data_parallel: DataParallel) -> float | None:
    """One optimizer step on `batch`'s texts (and base replay) -> the texts' cross-entropy (None where another
    process computed the step)."""
    sft = None
    replays = replay is not None and (config.replay_coef > 0 or config.rehearsal_kl_coef > 0)
    drawn = replay(config.replay_per_minibatch, rng) if replays else None
    optimizer.zero_grad(set_to_none=True)
    if data_parallel.is_main:
        policy.eval()  # no dropout: as the update's steps (update.py, stage 1)
        sft = _cross_entropy(policy, context, [context.encodings.of(i.feedback_id, i.samples) for i in batch],
                             [context.tokenizer.encode(whisper_style(i.target)) for i in batch])
        loss = config.sft_coef * sft
        if drawn:
            loss = loss + _replay_loss(policy, context, drawn, config)
        loss.backward()
    data_parallel.sum_gradients(policy.parameters())
    torch.nn.utils.clip_grad_norm_(policy.parameters(), config.grad_clip_norm)
    optimizer.step()
    return float(sft.detach()) if sft is not None else None


def _replay_loss(policy: WhisperPolicy, context: WhisperRolloutContext, drawn: list, config: PPOConfig,
                 ) -> torch.Tensor:
    """A rehearsal step's hold on base behaviour over replayed base utterances: replay_coef x their
    cross-entropy plus rehearsal_kl_coef x the exact KL to the frozen reference over the full distributions at
    their tokens. The cross-entropy holds only the replayed tokens; the KL holds every token's probability
    there (distillation): in the adaptation bench 128 corrections taught -26.5% domain WER with it, -21.6%
    without, the gate refusing 4 of 8 cycles either way (docs/benchmarks.md, "A KL on replay")."""
    cross_k, cross_v = context.encodings.full([encoded for encoded, _ in drawn])
    targets = [tokens for _, tokens in drawn]
    log_probs, chosen, mask = candidate_log_probs(policy, cross_k, cross_v, targets)
    loss = -config.replay_coef * masked_mean(chosen, mask)
    if config.rehearsal_kl_coef > 0:
        with torch.no_grad():
            ref_log_probs, _, _ = candidate_log_probs(context.reference, cross_k, cross_v, targets)
        loss = loss + config.rehearsal_kl_coef * kl_to_reference(log_probs, ref_log_probs).mean()
    return loss


def whisper_replay_sampler(pool, context: WhisperRolloutContext):
    """A ReplaySampler over base-corpus utterances: (encoded audio, Whisper-style target tokens) pairs, each
    utterance encoded once (update.ReplaySampler, with this kind's minibatch loss as the consumer)."""
    keyed = [(-(index + 1), utterance) for index, utterance in enumerate(pool)]  # keys apart from feedback ids

    def sample(count: int, rng: random.Random):
        drawn = rng.sample(keyed, min(count, len(keyed)))
        return [(context.encodings.of(key, u.float_samples()), context.tokenizer.encode(whisper_style(u.text)))
                for key, u in drawn]

    return sample


@torch.no_grad()
def whisper_mean_rewards(policy: WhisperPolicy, items: Sequence[FeedbackItem], config: PPOConfig,
                         generator: torch.Generator, context: WhisperRolloutContext) -> tuple[float, float]:
    """(sampled, greedy) mean reward of the policy on `items`: the before/after figure of a cycle (one sample an
    item: the figure is a diagnostic, and each sample is a full decode)."""
    policy.eval()
    generated = _generate_groups(policy, context, items, 1, True, generator, config.sampling_temperature)
    sampled = [item.reward(context.tokenizer.normalized(rows[0]), config.reward_unit)
               for item, rows in zip(items, generated, strict=True)]
    greedy = [item.reward(context.tokenizer.normalized(rows[1]), config.reward_unit)
              for item, rows in zip(items, generated, strict=True)]
    return (float(np.mean(sampled)) if sampled else math.nan, float(np.mean(greedy)) if greedy else math.nan)
