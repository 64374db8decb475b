"""The work bound of one request, in one place (the page, `--help` and the README say these).

Work is width x height x steps x images x columns. On 2 CPU cores an SD 1.5-size UNet step with
guidance costs 39 us per pixel and the VAE decode 17 s per 512 px image (`python
benchmarks/app_work.py`): a minute buys about 1.4 M units (512 x 512 x 5 steps, one image, one
column). A GPU gets GPU_FACTOR x that (an estimate: no GPU measured it yet).
"""

CPU_MAX_WORK = 1_400_000
GPU_FACTOR = 200
DEFAULT_MAX_WORK = {"cpu": CPU_MAX_WORK, "gpu": CPU_MAX_WORK * GPU_FACTOR}
