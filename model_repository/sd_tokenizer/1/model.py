"""sd_tokenizer: prompts -> CLIP token ids in 77-token chunks, AUTOMATIC1111-style (never cut).

All prompts of one request (a prompt and its negative prompt) are padded to the same number of
chunks; `chunks` tells the caller how to fold the encoder's output back: (prompts, chunks * 77, hidden).
`weights` is each position's emphasis ((word:1.2) and the like), which the caller applies to the
encoder's output (kiln.prompts.apply_emphasis); syntax kiln does not run is refused by name.
`clip_skip` (AUTOMATIC1111's CLIP_stop_at_last_layers, one per request) comes back once per row of
ids, so that the text encoder batches requests with different clip skips.

Textual inversion (builds with `textual_inversion_dim`): the request carries the embeddings its prompts may name
(`embedding_names`, `embedding_sizes`, `embedding_vectors`: the service reads the files, so this server needs no
folder of its own); a name used as a word becomes its vectors' positions (kiln.prompts.EmbeddingLookup), and
`token_vectors` hands the vectors to the text encoder (one zero row when none is used).
"""

import os
import site
import sys

for _path in os.environ.get("KILN_SITE_PACKAGES", "").split(os.pathsep):  # see kiln/triton_install.py
    if _path:
        site.addsitedir(_path)
_own = set(site.getsitepackages() + [site.getusersitepackages()])  # the stub interpreter's: after the above
sys.path.sort(key=lambda _p: _p in _own)

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from kiln.errors import InputError
from kiln.prompts import EmbeddingLookup, embeddings_from_tensors, load_tokenizer, tokenize_weighted_batch
from kiln.runtime import model_config
from kiln.runtime.model import error_response


class TritonPythonModel:
    def initialize(self, args):
        _, params = model_config(args)
        self.tokenizer = load_tokenizer(Path(args["model_repository"]) / args["model_version"] / "tokenizer")
        self.max_chunks = int(params["max_chunks"])
        self.layers = int(params["clip_skip_layers"])
        self.hidden = int(params.get("textual_inversion_dim", "0"))  # 0: a build whose text encoder takes ids only

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy().reshape(-1)
            clip_skip = int(pb_utils.get_input_tensor_by_name(request, "clip_skip").as_numpy().reshape(-1)[0])
            if not 1 <= clip_skip <= self.layers:
                responses.append(error_response(f"sd_tokenizer: clip_skip {clip_skip} is outside 1 to {self.layers} "
                                                "(the text encoder's layers)"))
                continue
            try:
                prompts = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in raw]
                lookup = self._embeddings(request)
                ids, weights, chunks = tokenize_weighted_batch(self.tokenizer, prompts, self.max_chunks, lookup)
            except UnicodeDecodeError:
                responses.append(error_response("sd_tokenizer: prompt or embedding name is not UTF-8"))
                continue
            except InputError as exc:
                responses.append(error_response(f"sd_tokenizer: {exc}"))
                continue
            outputs = [
                pb_utils.Tensor("input_ids", ids.astype(np.int64)),
                pb_utils.Tensor("chunks", np.array([chunks], dtype=np.int32)),
                pb_utils.Tensor("weights", weights.astype(np.float32)),
                pb_utils.Tensor("clip_skip", np.full(len(ids), clip_skip, dtype=np.int64)),
            ]
            if lookup is not None:
                outputs.append(pb_utils.Tensor("token_vectors", lookup.vectors))
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

    def _embeddings(self, request) -> EmbeddingLookup | None:
        """The request's textual-inversion embeddings; None for a build without them."""
        if not self.hidden:
            return None
        tensors = [pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                   for name in ("embedding_names", "embedding_sizes", "embedding_vectors")]
        if tensors[2].ndim != 2 or tensors[2].shape[1] != self.hidden:
            raise InputError(f"embedding_vectors: shape {tensors[2].shape}, expected (n, {self.hidden})")
        return EmbeddingLookup(self.tokenizer, embeddings_from_tensors(*tensors), self.hidden)
