"""train.py: build, least-squares initialise, train (DDP + AMP) and evaluate an SN-Net, the timm way.

    train.py DATA --stitch_config configs/deit_ti_s_b.json [timm flags]        # train, then evaluate every stitch
    train.py DATA --stitch_config ... --eval --resume CKPT                     # evaluate every stitch
    train.py DATA --model vit_tiny_patch16_224 [timm flags]                    # one plain model

parse (args.py) -> one frozen `RunOptions`, resolved once (resolve.py) -> every check (preflight.py) ->
`Trainer.for_run` (trainer.py: data, network, LS init or resume) -> `fit` -> `evaluate`. One run per output folder:
rank 0 locks it (torchrun's other ranks write into rank 0's folder); the kernel releases the lock when the process
dies, so a crashed run never leaves it stuck, and a refused run's release removes the folder it made.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from contextlib import nullcontext

import torch

from snnet.data.checks import warn_small_classes_here
from snnet.stitching.config import StitchConfig
from snnet.train.args import fitted_notes, parse_args, set_by
from snnet.train.describe import describe_run, to_yaml
from snnet.train.device import adopt_slurm_env, apply_onednn_switch, cpu_has_fast_bf16, device_from_flag
from snnet.train.loggers import check_loggers
from snnet.train.options import RunOptions
from snnet.train.preempt import STOP, Preempted
from snnet.train.preflight import check_output, check_recipe, check_run
from snnet.train.resolve import resolve
from snnet.train.trainer import Trainer
from snnet.utils.distributed import say_refusal, world
from snnet.utils.errors import SNNetError, one_line
from snnet.utils.fileio import FolderLock

_logger = logging.getLogger("snnet")


def main(argv: list[str] | None = None) -> int:
    """train.py's program: returns its exit code (0; 2 for bad input, said in one line; 3 for a non-finite loss;
    Slurm's code for a preempted run that saved its recovery checkpoint)."""
    # a warning's line says so ("HH:MM:SS warning: ..."): quickstart relays such lines of its steps to its console
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelprefix)s%(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_level_prefix)
    STOP.install()  # train.py installed it before its imports; callers of main() get it here, before any work
    apply_onednn_switch()  # before any kernel runs
    try:
        adopt_slurm_env()  # under srun: RANK, WORLD_SIZE ... from Slurm's variables, before anything reads them
        args, stitch_cfg = parse_args(argv)  # parse (each flag checked as typed)
        options = resolve(RunOptions.from_values(vars(args)))  # typed and resolved, once
        warn_slow_amp(options)
        if options.job.dry_run:
            dry_run(options, stitch_cfg)
            return 0
        rank = world(launched=True)[0]
        check_output(options.out_dir)  # it can be made, and no other run holds it
        with FolderLock(options.out_dir) if rank == 0 else nullcontext():
            check_run(options, stitch_cfg, anchor_checkpoints=True, locked=True)  # every input, before any work
            check_loggers(options.logging)
            if rank == 0:
                for note in fitted_notes():  # the defaults parsing fitted to this run (a short run, a small machine)
                    _logger.info(note)
            trainer = Trainer.for_run(options, stitch_cfg)
            if not options.job.eval:
                trainer.fit()
            trainer.evaluate()
    except Preempted as e:  # every rank stopped at the same step, the recovery checkpoint written: a clean exit
        if world(launched=True)[0] == 0:
            print(f"preempted: {e}", file=sys.stderr)
        _leave_group()
        return e.exit_code
    except SNNetError as e:  # every rank meets the same input: one line is enough
        say_refusal(f"error: {one_line(e)}")
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; the checkpoints written so far stay
        if world(launched=True)[0] == 0:
            print("interrupted; the same command with --auto-resume continues from the last checkpoint",
                  file=sys.stderr, flush=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            os._exit(130)  # as below: tearing the group down can block on peers that are gone
        return 130
    except BaseException:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # a peer crashed or the group broke: leave now. Interpreter teardown (process-group destructors) can
            # block on dead connections and keep torchrun from restarting the workers (--max-restarts)
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        raise
    # only after a clean run: with a crashed peer, tearing the group down can block forever
    _leave_group()
    return 0


def dry_run(options: RunOptions, stitch_cfg: StitchConfig | None) -> None:
    """--dry-run: the checks that need no data, device or file of this machine, then rank 0 prints the resolved run
    (args.yaml's YAML) before any process group, weight or image."""
    net = check_recipe(options, stitch_cfg)  # the network on the meta device, described below
    warn_small_classes_here(options.data)  # the data's one warning, when the folder is on this machine
    if world(launched=True)[0] == 0:
        device_type = device_from_flag(options.train.device, here=False).type  # the run's, on its machine
        print(to_yaml(describe_run(options, stitch_cfg, device_type, net)), end="")


def warn_slow_amp(options: RunOptions) -> None:
    """On a CPU without bf16 instructions (AVX-512 BF16 or AMX), bf16 autocast runs reference kernels, many times
    slower than fp32: said once (rank 0), naming where amp was asked for and how to turn it off."""
    if (options.amp_dtype == torch.bfloat16 and options.device.type == "cpu" and not options.job.dry_run
            and world(launched=True)[0] == 0 and not cpu_has_fast_bf16()):
        _logger.warning(f"amp (from {set_by('amp')}) on this CPU: it has no bf16 instructions (AVX-512 BF16 or AMX), "
                        f"so bf16 autocast runs slow reference kernels, many times slower than fp32; pass --no-amp")


def _level_prefix(record: logging.LogRecord) -> bool:
    """A warning's line starts "warning: " once: the data layer's messages carry it themselves, for the snnet
    commands that log without this format."""
    record.levelprefix = "warning: " if record.levelno >= logging.WARNING and \
        not record.getMessage().startswith("warning: ") else ""
    return True


def _leave_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
