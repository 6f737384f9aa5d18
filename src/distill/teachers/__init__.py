"""Where distillation targets come from: :class:`Teacher` and its implementations.

* :class:`ModelTeacher`: a frozen in-process model (own device, dtype, quantization).
* :class:`CachedTeacher`: top-k targets read from an offline cache (:func:`distill.cache.build_cache`);
  :class:`TopKTeacher`: the same top-k targets computed live.
* :class:`ServerTeacher`: top-k targets from a teacher behind a vLLM (OpenAI-compatible) server.
* :class:`DataTeacher`: the next token of the data, one-hot (plain fine-tuning through the same trainer).
"""

from distill.models.decoder import (
    OutputHead,
    UnsupportedModelError,
    decoder_of,
    final_hidden_states,
    full_logits,
    output_head_of,
)
from distill.teachers.base import Teacher, TeacherTargets
from distill.teachers.cached import CachedTeacher, TopKTeacher
from distill.teachers.data import DataTeacher
from distill.teachers.hidden import catch_layer_outputs, decoder_layers
from distill.teachers.model import ModelTeacher
from distill.teachers.server import ServerTeacher
from distill.teachers.sharding import shard_teacher

__all__ = [
    "CachedTeacher",
    "DataTeacher",
    "TopKTeacher",
    "ModelTeacher",
    "ServerTeacher",
    "OutputHead",
    "Teacher",
    "TeacherTargets",
    "UnsupportedModelError",
    "catch_layer_outputs",
    "decoder_layers",
    "decoder_of",
    "final_hidden_states",
    "full_logits",
    "output_head_of",
    "shard_teacher",
]
