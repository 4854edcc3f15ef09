"""What downstream code runs: the text-to-image DDPM pipeline and its scheduler."""

from .pipeline_text2image_ddpm import TextToImageDDPMPipeline, TextToImageDDPMPipelineOutput
from .scheduling_ddpm import DDPMScheduler, DDPMSchedulerOutput

__all__ = ["DDPMScheduler", "DDPMSchedulerOutput", "TextToImageDDPMPipeline", "TextToImageDDPMPipelineOutput"]
