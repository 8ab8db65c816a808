"""The text a model reads for a task example: the raw prompt, or the prompt through the
tokenizer's chat template (task.chat), and the ids that end a completion."""

from __future__ import annotations

from pathlib import Path

from .config import ChatConfig, ConfigError
from .tasks import Example


class Prompter:
    """Renders examples as prompt text. Chat mode: [system], user = the task's prompt, the
    template's generation prompt, then the assistant prefix. The rendered text already holds
    any BOS the template writes, so it is tokenised without adding special tokens again."""

    def __init__(self, tokenizer, chat: ChatConfig, model_path: str = "") -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.template = None
        if chat.enabled:
            self.template = self._template(tokenizer, chat, model_path)
            self.render(Example("2+2=?", None))  # a template that cannot render fails now

    @staticmethod
    def _template(tokenizer, chat: ChatConfig, model_path: str) -> str:
        if chat.template_file:
            path = Path(chat.template_file)
            if not path.is_file():
                raise ConfigError(f"config field 'task.chat.template_file': no file '{path}'")
            try:
                return path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"config field 'task.chat.template_file': cannot read '{path}': {exc}"
                ) from exc
        template = getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str) or not template:
            raise ConfigError(
                f"config field 'task.chat.enabled': the tokenizer in '{model_path}' has no "
                "chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); "
                "set task.chat.template_file or task.chat.enabled=false"
            )
        return template

    @property
    def add_special_tokens(self) -> bool:
        return not self.chat.enabled

    def render(self, example: Example) -> str:
        if not self.chat.enabled:
            return example.prompt
        messages = [{"role": "user", "content": example.prompt}]
        if self.chat.system:
            messages.insert(0, {"role": "system", "content": self.chat.system})
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja2 syntax/undefined errors, raise_exception() calls
            source = self.chat.template_file or "the tokenizer's chat template"
            raise ConfigError(
                f"config field 'task.chat': {source} cannot render a prompt: {exc}"
            ) from exc
        return text + self.chat.assistant_prefix


def end_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends a completion: the generation config's eos_token_id (an int or a
    list, e.g. Qwen2.5-Instruct's <|im_end|> and <|endoftext|>) and the tokenizer's eos,
    in that order, without repeats."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids += [configured] if isinstance(configured, int) else list(configured)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ConfigError(
            "config field 'model.path': neither generation_config.json nor the tokenizer "
            "names an end-of-sequence token (eos_token_id)"
        )
    return list(dict.fromkeys(int(i) for i in ids))
