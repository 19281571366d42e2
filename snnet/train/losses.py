"""Training losses: timm's classification losses plus distillation from a teacher (hard or soft)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from snnet.stitching.build import create_anchor
from snnet.stitching.config import AnchorSpec
from snnet.train.options import LossOptions


def base_criterion(mixup_active: bool, smoothing: float) -> nn.Module:
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
            # DeiT's normalisation (SN-Net used DeiT's loss): the sum over batch and classes / (batch x classes)
            distill = F.kl_div(F.log_softmax(head_dist / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                               reduction="sum", log_target=True) * (t * t) / head_dist.numel()
        else:
            distill = F.cross_entropy(head_dist, teacher_logits.argmax(dim=1))
        return (1 - self.alpha) * loss + self.alpha * distill


def create_teacher(loss: LossOptions, device: torch.device, anchors: dict[str, AnchorSpec] | None = None
                   ) -> nn.Module:
    """The frozen distillation teacher: the stitch config's anchor labelled --teacher (`anchors`, label -> spec:
    its checkpoint and model_kwargs), or a timm model by name with hub weights or --teacher-checkpoint."""
    spec = (anchors or {}).get(loss.teacher)
    if spec is not None and not loss.teacher_checkpoint:
        teacher = create_anchor(spec, pretrained=spec.checkpoint is None and not loss.no_pretrained,
                                num_classes=loss.num_classes)
        return _frozen(teacher, device)
    offline = loss.no_pretrained and not loss.teacher_checkpoint
    if offline:  # --no-pretrained means no download anywhere: the recipe still runs, offline, with a random teacher
        logging.getLogger("snnet").warning(f"--no-pretrained: the teacher {loss.teacher!r} is random too (no "
                                           f"download); give --teacher-checkpoint for a trained one")
    teacher = create_anchor(AnchorSpec(loss.teacher, loss.teacher_checkpoint or None),
                            pretrained=not loss.teacher_checkpoint and not offline, num_classes=loss.num_classes)
    return _frozen(teacher, device)


def _frozen(teacher: nn.Module, device: torch.device) -> nn.Module:
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher


def create_mixup(loss: LossOptions) -> Mixup | None:
    """timm's Mixup for the run's flags, or None when mixup and cutmix are off."""
    if not (loss.mixup > 0 or loss.cutmix > 0 or loss.cutmix_minmax is not None):
        return None
    return Mixup(mixup_alpha=loss.mixup, cutmix_alpha=loss.cutmix, cutmix_minmax=loss.cutmix_minmax,
                 prob=loss.mixup_prob, switch_prob=loss.mixup_switch_prob, mode=loss.mixup_mode,
                 label_smoothing=loss.smoothing, num_classes=loss.num_classes)


def create_loss(loss: LossOptions, device: torch.device, anchors: dict[str, AnchorSpec] | None = None
                ) -> tuple[DistillationLoss, Mixup | None]:
    """(loss_fn(inputs, outputs, targets), mixup_fn or None) for the run's flags, as timm's train.py wires them;
    `anchors` (label -> spec) are the stitch config's, which --teacher may name."""
    mixup_fn = create_mixup(loss)
    teacher = create_teacher(loss, device, anchors) if loss.distillation_type != "none" else None
    loss_fn = DistillationLoss(base_criterion(mixup_fn is not None, loss.smoothing), teacher, loss.distillation_type,
                               loss.distillation_alpha, loss.distillation_tau).to(device)
    return loss_fn, mixup_fn
