"""`fedrec export`: a teacher or student checkpoint → a verifiable edge bundle (ONNX FP32/INT8,
tokenizer, item embeddings, manifest) and, on a GPU, a TensorRT engine."""
