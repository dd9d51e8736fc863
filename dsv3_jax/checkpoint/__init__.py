"""Checkpoints: ``orbax_io`` (the one on-disk layout, ``load_checkpoint``, the trainer's ``Checkpointer``),
``convert`` (HF ⇄ ours, streaming), ``mapping`` (the HF name table), ``hf_source`` / ``safetensors_io``
(reading HF weights), ``fp8`` (the release's FP8 block format)."""
