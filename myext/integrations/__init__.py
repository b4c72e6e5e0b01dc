"""Integrations of myext's ops with other libraries.

Each submodule imports its library when it is itself imported, never from here:
``import myext`` does not need any of them.

* :mod:`myext.integrations.transformers`: Hugging Face causal language models compute
  their training loss with :func:`myext.linear_cross_entropy`, the logits never held
  (``fuse_causal_lm``, ``unfuse_causal_lm``).
"""
