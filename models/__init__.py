"""Two-tower recommender: towers, training loss, retrieval wrapper, ONNX export."""
