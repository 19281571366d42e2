"""`snnet stitch-train`: train one stitching layer between two frozen anchors (Traft & Cheney's experiment).

A run is the network

    front anchor, from its input up to and including its block i  ->  stitch  ->  end anchor from block j on

with blocks numbered flat over the stages (0 = the first block). j may be any block (a "gap"): the block aligned with
i, one after it (dropping depth), one before it (repeating depth), or one past the last block (the end anchor only
runs its final norm and head). Front and end may be the same anchor, two anchors of one family, or two families whose
features meet at the same number of positions: the layout bridges (tokens, NHWC, NCHW) and the prefix-token bridge
of `stitching.cut.CutStitch` (a class-token ViT <-> CNN pair drops the class token, or predicts it). Only the stitch
trains: both anchors are frozen and stay in eval mode, so their weights and BatchNorm statistics are exactly the
given ones after training, and dropout / drop-path stay off. The loss is cross-entropy, or distillation from the end
anchor's own logits (KL at a temperature, mixed with cross-entropy by kd_alpha).

The package, by concern:

* `sweep.py`: the sweep file (YAML, docs/stitch_train.md): schema, checks, the runs it expands to; anchors in the
  one anchor syntax of every tool (`snnet.stitching.config.parse_anchor`).
* `network.py`: the stitched network, on the core's one cut mechanism: `snnet.stitching.cut` (cut points, the
  stitchability rule, `CutStitch` and its least-squares fit) and a `snnet.stitching.model.ComposedNet` of one
  `Composition`, as `snnet search` builds its networks.
* `runner.py`: the sweep prepared (anchors seeded, built once, hashed by their weights) and one run trained and
  evaluated with train.py's loop, optimizer, schedule, loaders and losses.
* `jobs.py`: the sweep's jobs split across torchrun processes or the tasks of a Slurm job array, and the results
  file (the command line is `snnet.cli`'s ``stitch-train``).
* `plots.py`: the sweep's plots.

Nothing is imported here, so the command line checks a sweep (`sweep.py`, without torch) before it imports torch.

Each run writes, in its own folder named after what it is plus a hash of everything that defines it (so editing the
sweep never mixes runs): ``trajectory.jsonl`` (a line per optimizer step and per epoch, rewritten atomically after
every epoch), ``stitch_layer.pth.tar`` (the trained stitch) and, last, ``result.json`` (metadata and final metrics).
A run whose result.json exists is finished and skipped by a rerun. The sweep folder gets ``stitches_res.txt``
(cfg_id = the run's index in the sweep; the anchors follow as the last cfg_ids) that `snnet pareto` reads.

Under torchrun the jobs are split across the processes (job k on rank k mod world size), each run in one process,
with no communication: a run's result is then the same whether the sweep ran in one process or in many, and a
half-finished sweep can be continued with any number of processes. Sweeps are many small, independent jobs (only a
stitch trains, anchors in eval mode have nothing to synchronise), so splitting them scales with no gradient
all-reduce and no batch-size/LR coupling to the world size. At the end the processes meet once (a gloo process
group, used only as a barrier) and rank 0 writes the results file and the table.

On Slurm, ``--submit`` sends the unfinished jobs as a job array (`submit_array`, docs/slurm.md): array task k runs
job k alone (``--task k``, as Traft & Cheney's launcher runs one experiment per array task), and the task that
finds every job finished writes the results file; ``--merge`` writes it from whatever is finished.

User errors are `SNNetError`s (`SweepError` and the core's own); `snnet`'s main catches them once and prints one
line (on rank 0 only).
"""

__all__ = ["jobs", "network", "plots", "runner", "sweep"]
