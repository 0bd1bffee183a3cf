"""The denoising loop as a library: requests, one validation, injected components, samplers, the pipeline.

    from orchestrator.pipeline import Pipeline, Txt2ImgRequest
    result = Pipeline.from_triton("127.0.0.1:8001").txt2img(Txt2ImgRequest("a photo of a cat", seed=42))
"""

from orchestrator.pipeline.components import Components
from orchestrator.pipeline.pipeline import Pipeline, UNetCall
from orchestrator.pipeline.requests import (
                                            Cancelled,
                                            ControlNetUnit,
                                            GenerationResult,
                                            HiresFix,
                                            Img2ImgRequest,
                                            ProgressCallback,
                                            Refiner,
                                            SDUpscale,
                                            SoftInpainting,
                                            Txt2ImgRequest,
)
from orchestrator.pipeline.sampling import SAMPLERS, UnknownSampler, make_scheduler
from orchestrator.pipeline.seeds import with_seeds
from orchestrator.pipeline.validate import Limits, check_job, check_request

__all__ = ["SAMPLERS", "Cancelled", "Components", "ControlNetUnit", "GenerationResult", "HiresFix", "Img2ImgRequest",
           "Limits", "Pipeline", "ProgressCallback", "Refiner", "SDUpscale", "SoftInpainting", "Txt2ImgRequest",
           "UNetCall", "UnknownSampler", "check_job", "check_request", "make_scheduler", "with_seeds"]
