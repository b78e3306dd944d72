"""The toy world of `make demo` and the tests: the copy-the-digit task (`toy_task`), a tiny Qwen2
model with a locally trained tokenizer (`make_toy_model`), its dataset (`make_toy_data`), and the
demo runner (`run_demo`: server, two DeepSpeed CPU ranks, plot, summary)."""
