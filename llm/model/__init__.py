from llm.model.transformer import (
    DecodeCache,
    FFNContext,
    ModelOutput,
    Transformer,
    build_model,
    flops_per_token,
    output_std,
)

__all__ = ["DecodeCache", "FFNContext", "ModelOutput", "Transformer", "build_model", "flops_per_token",
           "output_std"]
