from rollout.models.decoder import DecoderForCausalLM, WeightTarget

# Llama, Qwen2 and Qwen3 differ only in flags read from the config (biases, q/k norm).
MODEL_CLASSES = {
    "LlamaForCausalLM": DecoderForCausalLM,
    "Qwen2ForCausalLM": DecoderForCausalLM,
    "Qwen3ForCausalLM": DecoderForCausalLM,
}

__all__ = ["MODEL_CLASSES", "DecoderForCausalLM", "WeightTarget"]
