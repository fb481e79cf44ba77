"""An ipywidgets generation demo for notebooks: a prompt, the FasterTransformer sampling knobs, and the completion
streaming in as tokens are produced (ftlab.generate.stream underneath)."""
from __future__ import annotations

import html

from .generate import GenerationError, stream


class GenerationDemo:
    """`GenerationDemo(model, tokenizer).widget` is the UI; `.generate()` is what its button runs (callable from code,
    which is how the notebook is exercised headless)."""

    def __init__(self, model, tokenizer, *, prompt: str = "def main():", max_new_tokens: int = 32):
        import ipywidgets as w

        self.model, self.tokenizer = model, tokenizer
        self.prompt = w.Textarea(value=prompt, description="prompt", layout=w.Layout(width="90%"))
        self.top_k = w.IntSlider(value=40, min=0, max=200, description="top_k")
        self.top_p = w.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top_p")
        self.temperature = w.FloatSlider(value=0.8, min=0.05, max=2.0, step=0.05, description="temperature")
        self.max_new_tokens = w.IntSlider(value=max_new_tokens, min=1, max=256, description="new tokens")
        self.seed = w.IntText(value=0, description="random_seed")
        self.button = w.Button(description="Generate", button_style="primary")
        self.output = w.HTML()
        self.button.on_click(lambda _: self.generate())
        self.widget = w.VBox([self.prompt, w.HBox([self.top_k, self.top_p]), w.HBox([self.temperature, self.seed]),
                              self.max_new_tokens, self.button, self.output])

    def _show(self, text: str, note: str = "") -> None:
        self.output.value = f"<pre>{html.escape(text)}</pre>{note}"

    def generate(self) -> str:
        """Run one request with the widgets' values, updating the output after every token; returns the text."""
        prompt_ids = [self.model.config.start_id] + self.tokenizer.encode(self.prompt.value)
        ids = list(prompt_ids)
        try:
            for step in stream(self.model, [prompt_ids], max_new_tokens=self.max_new_tokens.value,
                               top_k=self.top_k.value, top_p=self.top_p.value,
                               temperature=self.temperature.value, random_seed=self.seed.value):
                ids.append(step.token_ids[0])
                self._show(self.tokenizer.decode(ids, skip_special_tokens=True))
        except GenerationError as exc:  # a bad setting is shown, not raised: the demo keeps working
            self._show(self.tokenizer.decode(ids, skip_special_tokens=True), f"<b>error:</b> {html.escape(str(exc))}")
        return self.tokenizer.decode(ids, skip_special_tokens=True)
