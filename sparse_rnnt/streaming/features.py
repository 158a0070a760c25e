"""Incremental log-mel front end: the frames of :class:`~sparse_rnnt.data.features.LogMel`,
computed as audio arrives.

The full-utterance front end runs a centred STFT: the waveform ``x`` of ``N`` samples is
reflect-padded by ``p = n_fft // 2`` samples on both sides (``P = reflect(x)[p:1:-1] ++ x ++
reflect(x)[N-2:N-2-p:-1]``) and frame ``t`` is the window ``P[t*hop : t*hop + n_fft]``; there are
``1 + N // hop`` frames. Every frame depends only on its own window, so:

* the left pad needs samples ``x[1 : p+1]``: nothing is emitted before ``p + 1`` samples arrived;
* frame ``t`` is final as soon as its window lies inside ``left pad ++ samples so far``
  (``t*hop + n_fft <= p + received``);
* the last few frames touch the right reflect pad, which depends on the last ``p + 1`` samples,
  so they are computed by :meth:`StreamingLogMel.flush` at the end of the stream;
* a stream of fewer than ``p + 1`` samples (16 ms at the defaults) has no frame at all: the full
  front end cannot reflect-pad it (:class:`LogMel` raises), so the stream yields no frames and
  decodes to an empty hypothesis (with time-reduction stride >= 3, the at most 2 frames it could
  have had would be trimmed away by ``trim_to_stride`` anyway).

The same windowing, FFT, mel matrix and log as :class:`LogMel` are applied (its own
``MelSpectrogram`` module with centring switched off, on the padded signal), so incremental
frames equal full-utterance frames up to float rounding of batched FFT/matmul kernels (the test
measures the difference; it is 0 or a few ulp).
"""

from __future__ import annotations

import copy

import torch

from ..data.features import LogMel


class StreamingLogMel:
    """One stream's incremental log-mel extractor (not thread-safe; one per stream)."""

    def __init__(self, logmel: LogMel) -> None:
        c = logmel.config
        self.config = c
        self.hop = c.hop_length
        self.n_fft = c.n_fft
        self.pad = c.n_fft // 2
        self.log_floor = c.log_floor
        # Same window and filterbank as the full front end, framing the pre-padded signal.
        self._mel = copy.deepcopy(logmel.mel)
        self._mel.spectrogram.center = False
        self._head: list[torch.Tensor] = []  # samples before the left pad can be built
        self._head_len = 0
        self._buf: torch.Tensor | None = None  # padded signal P from index self._buf_start
        self._buf_start = 0
        self.num_samples = 0  # samples received
        self.next_frame = 0  # index of the next frame to emit
        self.flushed = False

    def _frames(self, segment: torch.Tensor) -> torch.Tensor:
        """``[n_fft + (n - 1) * hop]`` samples of ``P`` -> ``[n, n_mels]`` log-mel frames."""
        spec = self._mel(segment)  # [n_mels, n]
        return torch.log(spec + self.log_floor).transpose(0, 1).contiguous()

    def _empty(self) -> torch.Tensor:
        return torch.zeros(0, self.config.n_mels)

    def accept(self, samples: torch.Tensor) -> torch.Tensor:
        """Add ``samples [n]`` (float mono at ``config.sample_rate``) -> the frames that became
        final ``[k, n_mels]``."""
        if self.flushed:
            raise RuntimeError("accept() after flush(): the stream has ended")
        samples = samples.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        if samples.numel() == 0:
            return self._empty()
        self.num_samples += samples.numel()
        if self._buf is None:
            self._head.append(samples)
            self._head_len += samples.numel()
            if self._head_len < self.pad + 1:
                return self._empty()
            x = torch.cat(self._head)
            self._head = []
            left = x[1 : self.pad + 1].flip(0)  # reflect pad, edge sample excluded
            self._buf = torch.cat([left, x])
            self._buf_start = 0
        else:
            self._buf = torch.cat([self._buf, samples])
        # P has self.pad + num_samples samples so far (no right pad yet).
        last = (self.pad + self.num_samples - self.n_fft) // self.hop
        return self._emit(last)

    def _emit(self, last: int) -> torch.Tensor:
        """Frames ``next_frame .. last`` from the buffer; drop samples no longer needed."""
        assert self._buf is not None
        if last < self.next_frame:
            return self._empty()
        lo = self.next_frame * self.hop - self._buf_start
        hi = last * self.hop + self.n_fft - self._buf_start
        frames = self._frames(self._buf[lo:hi])
        self.next_frame = last + 1
        # Keep the next window's start, and always the last pad + 1 samples (right reflect pad).
        keep = min(self.next_frame * self.hop, self.num_samples - 1)
        if keep > self._buf_start:
            self._buf = self._buf[keep - self._buf_start :]
            self._buf_start = keep
        return frames

    def flush(self) -> torch.Tensor:
        """End of stream: the remaining frames (those touching the right pad) ``[k, n_mels]``.

        A stream of fewer than ``n_fft // 2 + 1`` samples (none included) has no frame: the
        result is empty (:class:`LogMel` raises there, as reflect padding needs more samples
        than the pad width).
        """
        if self.flushed:
            return self._empty()
        self.flushed = True
        if self._buf is None:  # too short to frame: no frame, like no audio
            self._head = []
            return self._empty()
        # x[N-1-p .. N-2] sit at P indices N-1 .. N-2+p; reflect them (edge sample excluded).
        right = self._buf[self.num_samples - 1 - self._buf_start : -1].flip(0)
        self._buf = torch.cat([self._buf, right])
        last = self.num_samples // self.hop  # total frames: 1 + N // hop
        return self._emit(last)
