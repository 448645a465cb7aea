"""The GPU check: every GPU-only promise of the project, tested on a machine lent for minutes.

    bash bench/gpu_check.sh OUT --part 1    then    bash bench/gpu_check.sh OUT --part 2

    __main__.py          the check: parts, the time budget, the report (OUT/gpu_check.json) and the log
    checking.py          steps, commands with time limits, what a step may raise; how a limit is derived
    limits.py            the CPU-measured basis of each step's limit (bench/results/gpu_check_cpu_basis.json)
    cpu_basis.py         measures that basis: python -m bench.gpu_check.cpu_basis
    steps_one_device.py  correctness on one GPU: every precision, fp16 overflow, FSDP2 kill + resume, SIGTERM
    steps_speed.py       torch.compile against eager, the throughput bench on the bert-base shape
    steps_multi.py       2 GPUs (NCCL): 1 vs 2 processes, SIGTERM to one rank
"""
