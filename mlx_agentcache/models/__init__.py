"""Models: named sources converted once to MLX folders (model_store, gguf_*,
tiny_models), loading them in the form fastest on this backend
(model_loader), and running them on agent caches (runner, mla)."""
