"""sd_tokenizer: prompts -> CLIP token ids in 77-token chunks, AUTOMATIC1111-style (never cut).

All prompts of one request (a prompt and its negative prompt) are padded to the same number of
chunks; `chunks` tells the caller how to fold the encoder's output back: (prompts, chunks * 77, hidden).
"""

import os
import site

for _path in os.environ.get("KILN_SITE_PACKAGES", "").split(os.pathsep):  # see orchestrator/triton_server.py
    if _path:
        site.addsitedir(_path)

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from build.runtime import model_config  # noqa: E402

from build.sd_weights import check_tokenizer  # noqa: E402
from orchestrator.prompts import pad_to_same_chunks, tokenize_prompt  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        from transformers import CLIPTokenizer

        _, params = model_config(args)
        folder = Path(args["model_repository"]) / args["model_version"] / "tokenizer"
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        check_tokenizer(self.tokenizer, str(folder))
        self.max_chunks = int(params["max_chunks"])

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy().reshape(-1)
            try:
                prompts = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in raw]
            except UnicodeDecodeError:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("sd_tokenizer: prompt is not UTF-8", pb_utils.TritonError.INVALID_ARG)))
                continue
            tokens = [tokenize_prompt(self.tokenizer, p) for p in prompts]
            longest = max(t.chunks for t in tokens)
            if longest > self.max_chunks:
                error = f"sd_tokenizer: prompt of {max(t.token_count for t in tokens)} tokens needs {longest} chunks; the limit is {self.max_chunks}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error, pb_utils.TritonError.INVALID_ARG)))
                continue
            ids = np.concatenate(pad_to_same_chunks(self.tokenizer, *tokens))
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("input_ids", ids.astype(np.int64)),
                pb_utils.Tensor("chunks", np.array([longest], dtype=np.int32)),
            ]))
        return responses
