"""torchaudio's Emformer RNN-T with our conventions: blank is the last symbol, right-context padding
inside the model, optional auxiliary CTC head on the encoder output."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchaudio.functional import rnnt_loss
from torchaudio.models import RNNT, emformer_rnnt_model

from .configs import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar used for backprop
    rnnt: torch.Tensor  # mean RNN-T loss per utterance (detached)
    ctc: torch.Tensor | None  # mean CTC loss per utterance (detached), if enabled
    per_utterance: torch.Tensor  # [B] RNN-T loss of each utterance (detached)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class EmformerRNNT(nn.Module):
    """Emformer RNN-T over ``num_symbols`` symbols; the blank is ``num_symbols - 1``."""

    def __init__(self, config: ModelConfig, num_symbols: int) -> None:
        super().__init__()
        if num_symbols < 2:
            raise ValueError(f"num_symbols must be >= 2, got {num_symbols}")
        config.validate()
        self.config = config
        self.num_symbols = num_symbols
        self.blank = num_symbols - 1
        kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        for key in ("name", "ctc_weight"):
            kwargs.pop(key)
        self.rnnt: RNNT = emformer_rnnt_model(num_symbols=num_symbols, **kwargs)
        self.ctc_head = nn.Linear(config.encoding_dim, num_symbols) if config.ctc_weight > 0 else None

    @property
    def activation_dtype(self) -> torch.dtype:
        """dtype of the features and of the activations between layers: that of the encoder's
        norms. An artifact keeps them (and the LSTM) in float32 while its exported linear layers
        compute in bf16 and hand back their input's dtype; a model cast whole runs in its dtype."""
        return self.rnnt.transcriber.transformer.emformer_layers[0].layer_norm_input.weight.dtype

    @property
    def right_context(self) -> int:
        return self.config.right_context_length

    def pad_right_context(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, T, F]`` -> ``[B, T + right_context, F]`` (zeros = the mean after CMVN)."""
        return F.pad(features, (0, 0, 0, self.right_context))

    def trim_to_stride(
        self, features: torch.Tensor, lengths: torch.Tensor, *, require_frames: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the last ``length % time_reduction_stride`` frames of each utterance (< 40 ms).

        Without this, a partial stack of frames lands in the Emformer's right context when the
        utterance is alone but in a masked padding position when it is batched with longer ones,
        so the encoder output would depend on the batch. Frames past each length are zeroed.
        ``features [B, T, F]``, ``lengths [B]`` -> ``[B, T2, F]``, ``[B]``. ``require_frames``:
        raise ``ValueError`` naming the items left with no encoder frame (read with the longest
        length in one device-to-host copy).
        """
        stride = self.config.time_reduction_stride
        lengths = lengths - lengths % stride
        if not lengths.numel():
            frames = 0
        elif require_frames:
            shortest, frames = (int(v) for v in torch.stack(torch.aminmax(lengths)).tolist())
            if shortest == 0:
                # No encoder frame: the RNN-T loss of such an item is meaningless (not inf), and
                # alone in a batch the Emformer fails deep inside.
                short = (lengths == 0).nonzero().flatten().tolist()
                raise ValueError(
                    f"batch item(s) {short} have fewer than {stride} feature frames, so no encoder frame "
                    "(the trainer's data screen skips such audio as too_short)"
                )
        else:
            frames = int(lengths.max())
        features = features[:, :frames]
        keep = torch.arange(frames, device=features.device)[None, :] < lengths[:, None].to(features.device)
        return features * keep[..., None].to(features.dtype), lengths

    def encode(
        self, features: torch.Tensor, lengths: torch.Tensor, *, require_frames: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-utterance encoder. ``features [B, T, F]``, ``lengths [B]`` -> ``[B, T', D]``, ``[B]``.

        The output of an utterance does not depend on what it is batched with.
        ``require_frames``: see :meth:`trim_to_stride`.
        """
        features, lengths = self.trim_to_stride(features, lengths, require_frames=require_frames)
        return self.rnnt.transcribe(self.pad_right_context(features), lengths)

    def prepend_blank(self, targets: torch.Tensor, target_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The predictor starts from blank: ``[B, U]`` -> ``[B, U + 1]``."""
        start = torch.full((targets.size(0), 1), self.blank, dtype=targets.dtype, device=targets.device)
        return torch.cat([start, targets], dim=1), target_lengths + 1

    def forward(
        self,
        features: torch.Tensor,
        feature_lengths: torch.Tensor,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
    ) -> LossOutput:
        """Training loss. ``features [B, T, F]``, ``feature_lengths [B]``, ``targets [B, U]``
        (padded, values in ``[0, blank)``), ``target_lengths [B]``."""
        targets = targets.to(torch.int32)
        target_lengths = target_lengths.to(torch.int32)
        enc, enc_lengths = self.encode(features, feature_lengths, require_frames=True)
        pred_in, pred_lengths = self.prepend_blank(targets, target_lengths)
        pred, _, _ = self.rnnt.predict(pred_in, pred_lengths, None)
        joint, _, _ = self.rnnt.join(enc, enc_lengths, pred, pred_lengths)
        enc_lengths = enc_lengths.to(torch.int32)
        per_utt = rnnt_loss(
            joint.float(), targets, enc_lengths, target_lengths, blank=self.blank, reduction="none"
        )
        rnnt = per_utt.mean()
        loss = rnnt
        ctc = None
        if self.ctc_head is not None:
            log_probs = self.ctc_head(enc).float().log_softmax(-1).transpose(0, 1)
            # Per-utterance sums averaged over the batch, on the same scale as the RNN-T loss.
            ctc = F.ctc_loss(
                log_probs, targets, enc_lengths, target_lengths, blank=self.blank,
                reduction="none", zero_infinity=True,
            ).mean()
            loss = rnnt + self.config.ctc_weight * ctc
        return LossOutput(
            loss=loss,
            rnnt=rnnt.detach(),
            ctc=None if ctc is None else ctc.detach(),
            per_utterance=per_utt.detach(),
        )


def build_model(config: ModelConfig, num_symbols: int, *, verbose: bool = True) -> EmformerRNNT:
    """Build the model and log its parameter count."""
    model = EmformerRNNT(config, num_symbols)
    n = count_parameters(model)
    msg = f"model {config.name}: {n:,} parameters ({n / 1e6:.2f}M) with {num_symbols} symbols"
    log.info(msg)
    if verbose:
        print(msg)
    return model
