"""diffusers' own scheduler tests (tests/schedulers/ of huggingface/diffusers, Apache-2.0), run against this
project's `pipelines.DDPMScheduler`. See the header of each file for where it came from and what changed."""
