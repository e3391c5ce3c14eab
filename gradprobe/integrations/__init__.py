"""gradprobe inside frameworks and platforms: a Lightning callback, a Hugging Face Trainer
callback, MLflow logging. Each module imports its framework only when used
(`pip install gradprobe[lightning]`, `gradprobe[transformers]`, `gradprobe[mlflow]`)."""
