"""Import of pretrained weights (Qwen2 / Qwen2.5 decoders, SigLIP 2 vision towers) and export.

  hf_folder  reads a Hugging Face folder (config.json + *.safetensors; local or gs://...)
             lazily, tensor by tensor, and places tensors straight into their target shardings
  qwen2      Qwen2 / Qwen2.5 -> the decoder; `python -m tuna2_jax.convert.qwen2`
  siglip2    SigLIP 2 / SigLIP vision tower -> Tuna-R's encoder;
             `python -m tuna2_jax.convert.siglip2`
  tuna2      official Tuna-2 / Tuna-R checkpoints (.safetensors, .pt) in and out;
             `python -m tuna2_jax.convert.tuna2`
  init_from  the parameters a run starts from (`init_from`, `init.decoder_from`, ...)
  export     trained parameters -> safetensors + config.json; `python -m tuna2_jax.convert.export`
"""
