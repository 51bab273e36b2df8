"""When a sequence stops: EOS, stop token ids, stop strings, max new tokens, the context length."""

from __future__ import annotations

from transformers import PretrainedConfig

from sluice.engine.clients.protocol import FinishReason
from sluice.engine.sequence import Sequence

# Stop strings are searched in the decoded tail of the output, not the whole of it, so the check stays
# O(1) per token; the tail covers the longest stop string even if every token decoded to a single byte.
_TAIL_SLACK_TOKENS = 4


class StopChecker:
    def __init__(self, tokenizer, model_config: PretrainedConfig, context_len: int):
        self.tokenizer = tokenizer
        self.context_len = context_len
        tokenizer_eos = tokenizer.eos_token_id if tokenizer is not None else None
        self.eos_ids = set(eos_ids(getattr(model_config, "eos_token_id", None), tokenizer_eos))

    def check(self, seq: Sequence, position: int) -> bool:
        """Set ``seq.finish`` (and ``matched_stop``) if the token at ``position`` of ``seq.token_ids`` ends it;
        True if it does. Tokens after ``position`` (a pending one) are not looked at."""
        params = seq.request.sampling_params
        end = position + 1
        token = seq.token_ids[end - 1]
        num_output = end - seq.num_prompt_tokens
        if not params.ignore_eos and token in self.eos_ids:
            seq.finish, seq.matched_stop = FinishReason.STOP, token
        elif token in params.stop_token_ids:
            seq.finish, seq.matched_stop = FinishReason.STOP, token
        elif params.stop and self._match_stop_string(seq, end):
            seq.finish = FinishReason.STOP
        elif num_output >= params.max_new_tokens or end >= self.context_len:
            seq.finish = FinishReason.LENGTH
        return seq.finish is not None

    def _match_stop_string(self, seq: Sequence, end: int) -> bool:
        stops = seq.request.sampling_params.stop
        start = max(seq.num_prompt_tokens, end - max(map(len, stops)) - _TAIL_SLACK_TOKENS)
        tail = self.tokenizer.decode(seq.token_ids[start:end], skip_special_tokens=False)
        if not any(stop in tail for stop in stops):
            return False
        text = self.tokenizer.decode(seq.token_ids[seq.num_prompt_tokens : end], skip_special_tokens=False)
        hits = [(text.find(stop), stop) for stop in stops if stop in text]
        if not hits:
            return False
        position, stop = min(hits)
        seq.text, seq.matched_stop = text[:position], stop
        return True


def eos_ids(config_eos: int | list[int] | None, tokenizer_eos: int | None) -> list[int]:
    ids = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
    if tokenizer_eos is not None and tokenizer_eos not in ids:
        ids.append(tokenizer_eos)
    return ids
