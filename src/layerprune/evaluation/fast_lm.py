"""`layerprune-fast`: lm-eval's HFLM, with log-likelihoods from the shared-prefix scorer (fast_scorer.py).

Everything up to the token ids is HFLM's own (prompts, `_encode_pair`, empty contexts, rolling windows), and
so is generation; only `_loglikelihood_tokens` is replaced. Models the tree mask cannot reproduce (encoder-
decoders, flash/flex attention, chunked or bidirectional attention) fall back to the stock path.
"""

from __future__ import annotations

import inspect
import sys
import time

import torch
from lm_eval import utils
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from layerprune.evaluation import fast_scorer as fs

ROW_TOKENS = 256  # trees are packed into rows of up to this many tokens; HFLM's batch_size rows per forward
ESTIMATE_AFTER_S = 10.0  # the time estimate is printed once the first requests took this long


def format_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def format_share(fraction: float) -> str:
    """A percentage with two significant digits below 10% (0.31%, not 0%)."""
    percent = fraction * 100
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.2g}%"


class Progress:
    """One bar over all requests. It advances by padded tokens, what a batch costs, so its ETA holds whatever
    the batches hold; once the first ESTIMATE_AFTER_S seconds are timed, it prints an estimate of the whole
    pass. `timeline` keeps every step (for bench/eval_speed.py)."""

    def __init__(self, requests: int, contexts: int, work: list[int], quiet: bool):
        self.requests, self.contexts, self.work, self.quiet = requests, contexts, work, quiet
        self.bar = tqdm(total=sum(work), disable=quiet, desc=self._done(0),
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        self.started = time.perf_counter()
        self.timeline: list[tuple[float, int, int]] = []  # (seconds, requests done, padded tokens done)
        self.estimate: tuple[float, float] | None = None  # (seconds timed, estimated total seconds)

    def advance(self, scored: int) -> None:
        done = self.timeline[-1][1:] if self.timeline else (0, 0)
        work = self.work[len(self.timeline)]
        elapsed = time.perf_counter() - self.started
        self.timeline.append((elapsed, done[0] + scored, done[1] + work))
        self.bar.set_description_str(self._done(done[0] + scored), refresh=False)
        self.bar.update(work)
        if self.estimate is None and elapsed >= ESTIMATE_AFTER_S and len(self.timeline) < len(self.work):
            fraction = self.timeline[-1][2] / sum(self.work)
            self.estimate = (elapsed, elapsed / fraction)
            if not self.quiet:
                self.bar.write(f"{self.requests:,} log-likelihood requests ({self.contexts:,} distinct contexts): "
                               f"about {format_seconds(elapsed / fraction)} in all (timed on the first "
                               f"{format_share(fraction)})", file=sys.stderr)

    def _done(self, requests: int) -> str:
        return f"log-likelihoods ({requests:,}/{self.requests:,} requests)"

    def close(self) -> None:
        self.bar.close()
        if not self.quiet and self.requests > 1:
            print(f"scored {self.requests:,} log-likelihood requests in "
                  f"{format_seconds(time.perf_counter() - self.started)}", file=sys.stderr, flush=True)


@register_model("layerprune-fast")
class FastHFLM(HFLM):
    """HFLM whose (context, continuation) log-likelihoods run each distinct context once."""

    def __init__(self, *args, row_tokens: int = ROW_TOKENS, **kwargs):
        super().__init__(*args, **kwargs)
        self.row_tokens = int(row_tokens)
        self.attention = fs.attention_plan(self.model) if self.backend == "causal" else None
        self.keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.progress: Progress | None = None  # of the last scoring pass

    @property
    def rows_per_batch(self) -> int:
        return self.batch_size if isinstance(self.batch_size, int) else 8  # "auto" probes CUDA memory: not here

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.attention is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        row_tokens = min(self.row_tokens, self.max_length)  # a row is no longer than one model window
        trees = fs.build_trees(requests, self.max_length, share_tokens=row_tokens)
        batches = fs.plan_batches(trees, row_tokens, self.rows_per_batch)
        contexts = sum(tree.contexts for tree in trees)
        self.progress = Progress(len(requests), contexts, [fs.padded_tokens(rows) for rows in batches],
                                 quiet=disable_tqdm or self.rank != 0)
        results: list = [None] * len(requests)
        for rows in batches:
            batch = fs.make_batch(rows, self.attention, self.model.dtype, self.device)
            with torch.no_grad(), self._autocast():
                logprobs = fs.forward_logprobs(self.model, batch, self.softmax_dtype, self.keeps_logits)
            scores = fs.read_scores(batch, logprobs)
            for index, logprob, greedy in scores:
                results[index] = (logprob, greedy)
                key = requests[index][0]
                if key is not None:  # rolling windows have no key; loglikelihood_rolling caches their sums
                    self.cache_hook.add_partial("loglikelihood", key, (logprob, greedy))
            self.progress.advance(len(scores))
        self.progress.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM's rolling windows, scored in one pass (one progress bar, every window batched)."""
        if self.world_size > 1 or self.attention is None:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        windows, owners = [], []
        for owner, (text,) in enumerate(req.args for req in requests):
            rolling = utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                      prefix_token=self.prefix_token_id,
                                                      max_seq_len=self.max_length, context_len=1)
            for window in map(utils.make_disjoint_window, rolling):
                windows.append((None, *window))
                owners.append(owner)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)
