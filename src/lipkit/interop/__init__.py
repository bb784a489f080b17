"""Checkpoints in and out: OpenCLIP state dicts, Hugging Face `CLIPModel` directories, ONNX graphs.

`open_clip.py` and `hf.py` map lipkit's `ModelSpec` and state dict to the peer's config and names
(lipkit's parameter names follow OpenCLIP, so that side is nearly a rename); `clip_bpe.py` builds
CLIP's BPE tokenizer with `tokenizers`; `onnx.py` exports the two towers; `peer_weights.py` reads the
peers' weight files. The peer libraries are optional (`pip install 'lipkit[interop]'`): reading and
writing either format needs only safetensors.
"""
