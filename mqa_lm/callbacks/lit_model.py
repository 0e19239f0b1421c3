"""The transformer that a callback's ``pl_module`` trains, typed for the callbacks."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import lightning as L

if TYPE_CHECKING:
    from mqa_lm.model import MQATransformer


def lit_model(pl_module: L.LightningModule) -> MQATransformer:
    """``pl_module.model``: the :class:`MQATransformer` of an :class:`~mqa_lm.lit_module.MQALitModule`.

    Lightning hands callbacks a plain ``LightningModule``, whose unknown attributes type-check as
    ``Tensor | Module``. These callbacks run only on an ``MQALitModule`` and read its model from
    ``on_fit_start`` on, after ``configure_model`` built it; so this only states the type and checks
    nothing at run time.
    """
    return cast("MQATransformer", pl_module.model)
