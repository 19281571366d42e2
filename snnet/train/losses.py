"""Training losses: timm's classification losses plus distillation from a teacher (hard or soft)."""
from __future__ import annotations

import logging

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
            # DeiT's normalisation (SN-Net used DeiT's loss): the sum over batch and classes / (batch x classes)
            distill = F.kl_div(F.log_softmax(head_dist / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                               reduction="sum", log_target=True) * (t * t) / head_dist.numel()
        else:
            distill = F.cross_entropy(head_dist, teacher_logits.argmax(dim=1))
        return (1 - self.alpha) * loss + self.alpha * distill


def create_teacher(args, device: torch.device) -> nn.Module:
    """The frozen distillation teacher: a timm model by name, hub weights or --teacher-checkpoint."""
    from snnet.core.build import create_anchor
    from snnet.core.config import AnchorSpec
    offline = getattr(args, "no_pretrained", False) and not args.teacher_checkpoint
    if offline:  # --no-pretrained means no download anywhere: the recipe still runs, offline, with a random teacher
        logging.getLogger("snnet").warning(f"--no-pretrained: the teacher {args.teacher!r} is random too (no "
                                           f"download); give --teacher-checkpoint for a trained one")
    teacher = create_anchor(AnchorSpec(args.teacher, args.teacher_checkpoint or None),
                            pretrained=not args.teacher_checkpoint and not offline, num_classes=args.num_classes)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher


def create_mixup(args):
    """timm's Mixup for the run's flags, or None when mixup and cutmix are off."""
    from timm.data import Mixup
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.num_classes)


def create_loss(args, device: torch.device):
    """(loss_fn(inputs, outputs, targets), mixup_fn or None) for the run's flags, as timm's train.py wires them."""
    mixup_fn = create_mixup(args)
    mixup_active = mixup_fn is not None
    teacher = create_teacher(args, device) if args.distillation_type != "none" else None
    loss_fn = DistillationLoss(base_criterion(mixup_active, args.smoothing), teacher, args.distillation_type,
                               args.distillation_alpha, args.distillation_tau).to(device)
    return loss_fn, mixup_fn
