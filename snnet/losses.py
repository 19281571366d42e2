"""Training losses: timm's classification losses plus distillation from a teacher (hard or soft)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def base_criterion(mixup_active: bool, smoothing: float) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if mixup_active:
        return SoftTargetCrossEntropy()  # smoothing is folded into the mixed targets
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


class DistillationLoss(nn.Module):
    """(1 - alpha) * base(student, target) + alpha * distill(student, teacher), as DeiT/SN-Net.

    When the student returns two heads (LeViT in training), the base loss uses the first and the distillation term
    the second, as DeiT's DistillationLoss does; otherwise the same logits feed both terms (SN-Net's
    StitchDistillationLoss).
    """

    def __init__(self, base: nn.Module, teacher: nn.Module | None, kind: str = "none", alpha: float = 0.5,
                 tau: float = 1.0):
        super().__init__()
        if kind not in ("none", "soft", "hard"):
            raise ValueError(f"distillation type {kind!r} is not known: use none, soft or hard")
        self.base, self.teacher, self.kind, self.alpha, self.tau = base, teacher, kind, alpha, tau

    def forward(self, inputs: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        head, head_dist = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        loss = self.base(head, targets)
        if self.kind == "none" or self.teacher is None:
            return loss
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        if self.kind == "soft":
            t = self.tau
            distill = F.kl_div(F.log_softmax(head_dist / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                               reduction="batchmean", log_target=True) * (t * t)
        else:
            distill = F.cross_entropy(head_dist, teacher_logits.argmax(dim=1))
        return (1 - self.alpha) * loss + self.alpha * distill
