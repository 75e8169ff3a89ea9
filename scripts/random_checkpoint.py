"""Write a randomly initialised checkpoint with the shape of SmolLM2-135M (or a given config.json).

Timing does not depend on weight values, so this stands in for the real model where its weights
are not available (e.g. on a GPU machine without the GGUF file):

    python scripts/random_checkpoint.py OUT_DIR [--config path/to/config.json]
"""

import argparse
import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--config", default=None)
a = ap.parse_args()
if a.config:
    cfg = AutoConfig.for_model(**json.load(open(a.config)))
else:
    cfg = LlamaConfig(**SMOLLM2_135M)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg).save_pretrained(a.out)
print(a.out)
