"""The engine: token ids in, token ids out. One step (prefill, hand-off, decode, sampling, refresh)
under a static batch (`BatchDecoder`) and a continuous one (`ContinuousBatcher`)."""
from .batch import BatchDecoder
from .continuous import ContinuousBatcher, Job, Stats, TokenEvent
from .sampling import Sampler, SamplingParams, sample
from .step import (compiled_decode_one_token, decode_one_token, decode_step, finish_reason, first_token, left_pad,
                   one_row_product_options, prefill, refresh)

__all__ = ["BatchDecoder", "ContinuousBatcher", "Job", "Sampler", "SamplingParams", "Stats", "TokenEvent",
           "compiled_decode_one_token", "decode_one_token", "decode_step", "finish_reason", "first_token",
           "left_pad", "one_row_product_options", "prefill", "refresh", "sample"]
