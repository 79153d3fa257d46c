"""Fleet tuning: several GPUs of one host (`tune --gpus`) and many hosts sharing one PostgreSQL
database (`tune --job NAME`, `tune --join NAME`), all through one claim queue (`flashtune.db.jobs`).

- `units`: how a job's keys are cut into claims (sibling classes, so the loop's bucket narrowing
  sees the same ranking as a single-GPU run);
- `worker`: one GPU's claim loop, with the heartbeat that keeps its lease;
- `gpus`: the `--gpus` value and each GPU worker's share of the cores;
- `command`: the `tune` command's fleet branch (jobs, one thread per GPU; what the run came to).

The fleet reads the command's options (tuner.options) and imports nothing of the CLI.
"""
