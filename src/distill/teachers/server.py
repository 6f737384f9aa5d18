"""A teacher behind an OpenAI-compatible vLLM server: its top-k prompt log-probs as sparse targets.

The teacher model runs elsewhere (e.g. ``vllm serve`` on rented GPUs with tensor parallelism); this
process sends each batch row's token ids to ``POST /v1/completions`` with ``prompt_logprobs=k`` and
turns the answer into :class:`~distill.losses.SparseTargets`, the same shape
:class:`~distill.teachers.TopKTeacher` computes in-process. Only the standard library talks to the
server (``urllib`` + a thread pool), so the training venv needs no vLLM or HTTP client.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.losses import SparseTargets
from distill.teachers.base import Teacher

__all__ = ["ServerError", "ServerTeacher", "TokenizerMismatchError"]

# Plain ASCII words and code: every token decodes to whole characters, so decoded strings compare exactly.
_CHECK_TEXT = (
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # The quick brown fox"
)


class ServerError(RuntimeError):
    """The teacher server refused a request, or could not be reached after the retries."""


class TokenizerMismatchError(ServerError):
    """The server's model does not use the student's tokenizer (its ids would mean other tokens)."""


def _error_message(body: bytes) -> str:
    """The server's own error text from an HTTP error body (vLLM: ``{"error": {"message": ...}}``)."""
    text = body.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        return text.strip()[:1000]
    error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return text.strip()[:1000]


class ServerTeacher(Teacher):
    """Top-k targets from a teacher served by vLLM (OpenAI-compatible ``/v1/completions``).

    For each right-padded row, one request asks for the prompt log-probs of its real tokens; entry
    ``t`` of the answer (the distribution of token ``t`` given tokens ``< t``) becomes position
    ``t - 1`` of the targets. Start the server with ``--max-logprobs`` at least ``top_k``.

    Args:
        base_url: the server, e.g. ``"http://10.0.0.5:8000"`` (with or without a trailing ``/v1``).
        model: the served model name (``--served-model-name``).
        top_k: entries per position.
        tokenizer: the student's tokenizer; when given, :meth:`check_tokenizer` runs at once and the
            trainer compares it with the student's.
        vocab_rows: rows of the teacher's head; default ``len(tokenizer)``.
        max_concurrency: requests in flight at once (one per batch row).
        timeout_s: seconds per request before it counts as failed (and is retried).
        retries: extra attempts after a connection error, timeout or HTTP 5xx.
        backoff_s: wait before the first retry in seconds; doubles each retry.
    """

    # Answers come over the network: the trainer requests the next micro-batches' targets ahead.
    prefetchable = True

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        top_k: int = 20,
        tokenizer: Any = None,
        vocab_rows: int | None = None,
        max_concurrency: int = 4,
        timeout_s: float = 60,
        retries: int = 4,
        backoff_s: float = 0.5,
    ) -> None:
        if top_k < 1 or max_concurrency < 1 or retries < 0:
            raise ValueError(f"Need top_k >= 1, max_concurrency >= 1, retries >= 0; got {top_k}, {max_concurrency}.")
        base_url = base_url.rstrip("/")
        self.base_url = base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url
        self.model = model
        self.top_k = top_k
        self.k = top_k
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._vocab_rows = vocab_rows
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    @property
    def vocab_rows(self) -> int:
        if self._vocab_rows is not None:
            return self._vocab_rows
        if self.tokenizer is None:
            raise ValueError("ServerTeacher needs tokenizer=... or vocab_rows=... to know the teacher's vocabulary.")
        return len(self.tokenizer)

    def describe(self) -> dict[str, Any]:
        """The teacher as a cache manifest records it (the URL is left out: a server may move between runs)."""
        return {"name": self.model, "revision": None, "dtype": "server", "quantization": "server",
                "vocab_rows": self.vocab_rows, "served_by": "vllm"}  # fmt: skip

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """The JSON answer to one POST, retried with exponential backoff on transient failures.

        Raises:
            ServerError: HTTP 4xx at once (the server's message quoted), or the last failure after the retries.
        """
        url = self.base_url + path
        data = json.dumps(payload).encode()
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                message = _error_message(error.read())
                if error.code < 500:
                    raise ServerError(self._client_error(url, error.code, message, payload)) from error
                failure = f"HTTP {error.code}: {message}"
            except urllib.error.URLError as error:  # connection refused, DNS, ... (also wraps timeouts)
                failure = f"{type(error.reason).__name__}: {error.reason}"
            except OSError as error:  # timeouts and resets while reading the answer
                failure = f"{type(error).__name__}: {error}"
        raise ServerError(
            f"The teacher server at {url} did not answer after {self.retries + 1} attempts "
            f"(timeout {self.timeout_s} s each); last failure: {failure}. Is the server running and reachable?"
        )

    def _client_error(self, url: str, code: int, message: str, payload: dict[str, Any]) -> str:
        """The error text for an HTTP 4xx: the server's message, plus the fix when it is the log-prob cap."""
        text = f"The teacher server at {url} refused the request (HTTP {code}): {message}"
        if "prompt_logprobs" in payload and "logprob" in message.lower():
            text += (
                f" -- top_k={self.top_k} is above the server's --max-logprobs: lower top_k, or restart the "
                f"server with --max-logprobs {self.top_k} (or more)."
            )
        return text

    def _complete(self, prompt: list[int] | str, prompt_logprobs: int) -> dict[str, Any]:
        """``choices[0]`` of a one-token greedy completion that carries the prompt's log-probs and ids."""
        payload = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "prompt_logprobs": prompt_logprobs,
            "return_token_ids": True,
        }
        return self._post("/v1/completions", payload)["choices"][0]

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Check ``tokenizer`` against the server (unless it is the one already checked), then keep it."""
        if tokenizer is not self.tokenizer:
            self.check_tokenizer(tokenizer)
            self.tokenizer = tokenizer

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a tokenizer other than the server model's.

        Three checks on a short text: the server tokenizes it to the same ids, echoes our ids back
        unchanged, and decodes each of them to the same string; and the tokenizer's last id exists
        on the server (a larger vocabulary would be answered with HTTP 400).

        Raises:
            TokenizerMismatchError: any of these differs.
        """
        ours = [int(i) for i in tokenizer(_CHECK_TEXT, add_special_tokens=True)["input_ids"]]
        probe = ours + [len(tokenizer) - 1]
        problem = ""
        try:
            by_text = self._complete(_CHECK_TEXT, 1)
            by_ids = self._complete(probe, 1)
        except ServerError as error:
            if "HTTP 4" not in str(error):
                raise
            problem = f"it refused our token ids ({error})"
        else:
            server_ids = by_text.get("prompt_token_ids")
            entries = zip(by_ids["prompt_logprobs"], probe, strict=True)
            decoded = [_actual_token(entry, token) for entry, token in entries]
            expected = [tokenizer.decode([token]) for token in probe]
            if server_ids is not None and list(server_ids) != ours:
                problem = f"it tokenizes {_CHECK_TEXT[:24]!r}... as {list(server_ids)[:8]}..., we as {ours[:8]}..."
            elif by_ids.get("prompt_token_ids") not in (None, probe):
                problem = "it does not echo our token ids unchanged"
            else:
                # Entry 0 has no log-probs (nothing precedes it), so its decoded string is unknown. Compare
                # stripped: vLLM restores the leading space that SentencePiece's decode drops from a lone token.
                pairs = zip(probe[1:], decoded[1:], expected[1:], strict=True)
                wrong = [(t, d, e) for t, d, e in pairs if d is not None and d.strip() != e.strip()]
                if wrong:
                    token, server_text, our_text = wrong[0]
                    problem = f"id {token} decodes to {server_text!r} on the server, to {our_text!r} here"
        if problem:
            raise TokenizerMismatchError(
                f"The server's model {self.model!r} at {self.base_url} does not use the student's tokenizer "
                f"({len(tokenizer):,} tokens): {problem}. Its ids would mean other tokens; serve a teacher that "
                "shares the student's tokenizer."
            )

    def _row_targets(self, row: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [len-1, k] int64, logprobs [len-1, k] float64)``: the top-k of tokens ``1..len-1`` of a row."""
        choice = self._complete(row, self.top_k)
        if choice.get("prompt_token_ids") not in (None, row):
            raise ServerError(f"The server at {self.base_url} changed the prompt's token ids; check its tokenizer.")
        entries = choice["prompt_logprobs"]
        if len(entries) != len(row):
            raise ServerError(f"The server returned {len(entries)} prompt log-prob entries for {len(row)} tokens.")
        ids = np.zeros((len(row) - 1, self.top_k), dtype=np.int64)
        logprobs = np.full((len(row) - 1, self.top_k), -np.inf)
        for t, entry in enumerate(entries[1:]):
            # The entry holds the top-k plus the actual token when it ranks below them: keep the k highest.
            ranked = sorted(entry.items(), key=lambda item: (-item[1]["logprob"], item[1].get("rank", 0)))
            ranked = ranked[: self.top_k]
            ids[t, : len(ranked)] = [int(token) for token, _ in ranked]
            logprobs[t, : len(ranked)] = [value["logprob"] for _, value in ranked]
            if len(ranked) < self.top_k:  # fewer than k (a tiny vocabulary): unused ids with zero mass
                unused = np.setdiff1d(np.arange(len(ranked) + self.top_k), ids[t, : len(ranked)])
                ids[t, len(ranked) :] = unused[: self.top_k - len(ranked)]
        return ids, logprobs

    def sample(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[str] | tuple[str, ...] = (),
        stop_token_ids: list[int] | tuple[int, ...] = (),
    ) -> list[list[int]]:
        """The server's sampled continuation of each prompt: its new token ids (stop and EOS not cut here).

        One request per prompt (``n=1``) with its own ``seed``, so a completion does not depend on
        which other prompts are in flight; ``max_concurrency`` requests at once, retried as in
        :meth:`targets`.

        Args:
            prompts: token ids of each prompt.
            seeds: one sampling seed per prompt.
            max_new_tokens: most tokens per completion.
            temperature, top_p, top_k: sampling settings (``top_k=0``: off).
            stop: strings that end a completion on the server (saves decoding; cut again by the caller).
            stop_token_ids: token ids that end a completion besides the model's EOS.
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"Need one seed per prompt; got {len(prompts)} prompts and {len(seeds)} seeds.")

        def one(prompt: list[int], seed: int) -> list[int]:
            payload = {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": max_new_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k if top_k > 0 else -1,
                "seed": seed,
                "n": 1,
                "stop": list(stop),
                "stop_token_ids": list(stop_token_ids),
                "return_token_ids": True,
            }
            choice = self._post("/v1/completions", payload)["choices"][0]
            if choice.get("token_ids") is None:
                raise ServerError(
                    f"The server at {self.base_url} returned no token_ids: it needs a vLLM with return_token_ids."
                )
            return [int(token) for token in choice["token_ids"]]

        return self._map(one, prompts, seeds)

    def generate(self, prompt_ids: Tensor, prompt_attention_mask: Tensor, **generation_kwargs: Any) -> Tensor:
        """``[batch, prompt + new]`` the left-padded prompts continued by the server (the trainer's ``seq_kd``).

        Reads the ``model.generate``-style settings the trainer passes (``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_p``, ``top_k``, ``pad_token_id``, ``eos_token_id``;
        others are ignored). Each row is sampled with a seed drawn from torch's global generator,
        which the trainer seeds, so a run repeats. New tokens are right-padded with ``pad_token_id``.

        Args:
            prompt_ids: ``[batch, prompt]`` left-padded prompt ids.
            prompt_attention_mask: ``[batch, prompt]`` 1 for real tokens.
        """
        settings = generation_kwargs
        sample = bool(settings.get("do_sample", False))
        eos = settings.get("eos_token_id")
        pad = settings.get("pad_token_id")
        pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos) or 0
        rows, masks = prompt_ids.cpu(), prompt_attention_mask.cpu().bool()
        prompts = [row[mask].tolist() for row, mask in zip(rows, masks, strict=True)]
        seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
        new = self.sample(
            prompts,
            seeds,
            max_new_tokens=int(settings["max_new_tokens"]),
            temperature=float(settings.get("temperature") or 1.0) if sample else 0.0,
            top_p=float(settings.get("top_p") or 1.0) if sample else 1.0,
            top_k=int(settings.get("top_k") or 0) if sample else 0,
            stop_token_ids=[] if eos is None else (list(eos) if isinstance(eos, list) else [eos]),
        )
        width = max([1, *(len(tokens) for tokens in new)])
        sequences = torch.full((len(prompts), rows.shape[1] + width), int(pad), dtype=rows.dtype)
        sequences[:, : rows.shape[1]] = rows
        for b, tokens in enumerate(new):
            sequences[b, rows.shape[1] : rows.shape[1] + len(tokens)] = torch.tensor(tokens, dtype=rows.dtype)
        return sequences.to(prompt_ids.device)

    def _map(self, function: Any, *columns: list[Any]) -> list[Any]:
        """``function`` over the columns' items, ``max_concurrency`` at a time, in order; the first error stops it."""
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency)
        try:
            return list(pool.map(function, *columns))
        finally:
            # On a failure, drop the queued items instead of retrying each of them against a dead server.
            pool.shutdown(wait=False, cancel_futures=True)

    @torch.no_grad()
    def targets(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> SparseTargets:
        """``[batch, seq, k]`` the server's top-k ids and log-probs and ``[batch, seq]`` tail mass.

        Position ``i`` of a row holds the distribution of token ``i + 1``; the last real position and
        the padding get valid filler (ids ``0..k-1``, uniform log-probs, tail 0) that the loss never reads.

        Args:
            input_ids: ``[batch, seq]`` token ids, right-padded or left-padded (on-policy batches).
            attention_mask: ``[batch, seq]`` 1 for real tokens; ``None``: every token is real.
            position_ids: only checked: packed rows (positions restarting mid-row) are refused.

        Raises:
            ServerError: a request failed (see :meth:`_post`), a row's real tokens are not one block, or packed.
        """
        batch, length = input_ids.shape
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).cpu()
        lengths = [int(n) for n in mask.sum(dim=1).tolist()]
        # Each row's real tokens are one block: right-padded (the collator) or left-padded (on-policy batches,
        # whose prompts generate() padded on the left).
        starts = [int(mask[b].argmax()) if lengths[b] else 0 for b in range(batch)]
        rows = input_ids.cpu()
        for b, (start, row_length) in enumerate(zip(starts, lengths, strict=True)):
            if int(mask[b, start : start + row_length].sum()) != row_length:
                raise ServerError(
                    "ServerTeacher needs each row's real tokens in one block, padded on the right or the left "
                    "(attention_mask 1...1 0...0 or 0...0 1...1)."
                )
            if position_ids is not None and not torch.equal(
                position_ids[b, start : start + row_length].cpu(), torch.arange(row_length, dtype=position_ids.dtype)
            ):
                raise ServerError("ServerTeacher does not support packed rows yet: train with packing=False.")
        ids = np.broadcast_to(np.arange(self.top_k, dtype=np.int64), (batch, length, self.top_k)).copy()
        logprobs = np.full((batch, length, self.top_k), -math.log(self.top_k))
        tail = np.zeros((batch, length))
        wanted = [b for b in range(batch) if lengths[b] > 1]  # a single token has no next-token target
        answers = self._map(lambda b: self._row_targets(rows[b, starts[b] : starts[b] + lengths[b]].tolist()), wanted)
        for b, (row_ids, row_logprobs) in zip(wanted, answers, strict=True):
            first, last = starts[b], starts[b] + lengths[b] - 1
            ids[b, first:last] = row_ids
            logprobs[b, first:last] = row_logprobs
            # float64 -expm1(logsumexp): no cancellation when the top-k hold almost all the mass.
            top = row_logprobs.max(axis=1, keepdims=True)
            logsumexp = top[:, 0] + np.log(np.exp(row_logprobs - top).sum(axis=1))
            tail[b, first:last] = np.clip(-np.expm1(logsumexp), 0.0, 1.0)
        device = input_ids.device
        return SparseTargets(
            torch.from_numpy(ids).to(device),
            torch.from_numpy(logprobs).float().to(device),
            torch.from_numpy(tail).float().to(device),
        )


def _actual_token(entry: dict[str, Any] | None, token: int) -> str | None:
    """The server's decoded string of the prompt token ``token`` from its prompt log-prob entry."""
    if entry is None:
        return None
    value = entry.get(str(token))
    return None if value is None else value.get("decoded_token")
