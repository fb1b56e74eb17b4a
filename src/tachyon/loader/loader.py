"""Build the model for this rank and fill its weights."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from tachyon.config import ModelConfig
from tachyon.loader.weights import iterate_dummy, iterate_gguf, iterate_safetensors
from tachyon.models.registry import get_model_class

logger = logging.getLogger(__name__)


def load_model(cfg: ModelConfig, device: torch.device) -> nn.Module:
    start = time.perf_counter()
    cls = get_model_class(cfg.hf_config)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(cfg.dtype)
    try:
        with torch.device(device):
            model = cls(cfg.hf_config, max_position=cfg.max_model_len)
    finally:
        torch.set_default_dtype(prev)
    if cfg.load_format == "dummy":
        weights = iterate_dummy(cfg.hf_config, cfg.seed, device, cfg.dtype)
    elif cfg.load_format == "gguf":
        weights = iterate_gguf(cfg.weights_path, cfg.hf_config)
    else:
        weights = iterate_safetensors(cfg.weights_path)
    model.load_weights(weights)
    model.eval()
    logger.info("loaded %s (%s) in %.1f s", cls.__name__, cfg.load_format,
                time.perf_counter() - start)
    return model
