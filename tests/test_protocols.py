"""The aligner protocols (`jaxalign.align.protocols`): the aligners the library ships and the test
stand-ins accept exactly the calls the protocols describe (signatures only; nothing is aligned)."""

import inspect

import pytest

from jaxalign.align import protocols
from jaxalign.align.blockmatch import block_match
from jaxalign.bench.evaluation import identity_aligner
from jaxalign.models.seamless import Pyramid
from jaxalign.stack.block import default_aligner
from tests.references import phase_aligner


def _call_of(protocol):
  """Positional and keyword arguments of a call in the protocol (placeholders for the values)."""
  params = list(inspect.signature(protocol.__call__).parameters.values())[1:]  # drop self
  pos = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
  kw = {p.name: None for p in params if p.kind == p.KEYWORD_ONLY}
  return pos, kw


@pytest.mark.parametrize("protocol, impl, bound", [
    (protocols.PairAligner, block_match, False),
    (protocols.PairAligner, identity_aligner, False),
    (protocols.PairAligner, Pyramid.__call__, True),
    (protocols.BatchedPairAligner, default_aligner(), False),
    (protocols.BatchedPairAligner, phase_aligner, False),
])
def test_aligners_accept_the_protocol_call(protocol, impl, bound):
  pos, kw = _call_of(protocol)
  args = (["self"] if bound else []) + pos
  inspect.signature(impl).bind(*args, **kw)  # TypeError if a protocol argument is refused or one is missing
  # the protocol's keyword arguments are optional in every implementation
  inspect.signature(impl).bind(*args)


def test_protocol_calls_are_what_the_docs_say():
  assert _call_of(protocols.PairAligner) == (["src", "tgt"], {"init_field": None, "src_defects": None,
                                                              "tgt_defects": None})
  assert _call_of(protocols.BatchedPairAligner) == (["srcs", "tgts"], {"src_defects": None, "tgt_defects": None,
                                                                       "init_fields": None})
  assert _call_of(protocols.StackAligner) == (["sections"], {"defects": None})
