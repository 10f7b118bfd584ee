"""The stage kinds that ship with alignpipe, one module each (a module may declare several kinds, e.g. grpo
and rloo), and what they share: the stage's context, the training loop, the helpers. Each module's `DECLARES`
is registered here into the recipe layer's registry (`alignpipe.recipe.kinds`), which loads this package on
its first read."""

from alignpipe.recipe.kinds import register
from alignpipe.stages import bon, dpo, grpo, kto, label, orpo, ppo, pretrain, reward, scaling, sft

# the order in which `alignpipe validate` and the errors list them
BUILTIN_MODULES = (pretrain, sft, reward, dpo, ppo, grpo, kto, orpo, label, scaling, bon)

for _module in BUILTIN_MODULES:
    for _kind in _module.DECLARES:
        register(_kind)
