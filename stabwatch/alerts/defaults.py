"""The default rule set (documented, with the reasoning behind each threshold, in docs/alerts.md)."""

from __future__ import annotations

from stabwatch.alerts.base import Rule, check_floor
from stabwatch.alerts.rules import (
    NonFiniteRule,
    RatioRule,
    SpikeRule,
    SustainedRule,
    ThresholdRule,
    TrendRule,
)
from stabwatch.metrics import AlertReason as R
from stabwatch.metrics import Severity as S

__all__ = [
    "ATTENTION_ENTROPY_FLOOR",
    "ATTENTION_LOGIT_CEILING",
    "CLEAR_AFTER",
    "COOLDOWN",
    "DEAD_STEPS",
    "GRAD_FLOOR",
    "GRAD_WEIGHT_FLOOR",
    "RATE_FLOOR",
    "SURROGATE_FLOOR",
    "UPDATE_FLOOR",
    "default_rules",
]

#: absolute floor of the relative gradient-explosion rules (``grad_explode``, ``grad_rising``,
#: ``grad_explode_layer``): a gradient norm below it is not an explosion, whatever its ratio to its past.
#: At a learning rate <= 0.1 such a gradient moves the weights by <= 1e-3 per SGD step; far below where
#: clipping is set in practice (max_norm 0.5-5). A dead network whose gradient creeps from 1e-6 to 1e-3
#: stays quiet; one going from 0.1 to 10 alerts as before.
GRAD_FLOOR = 1e-2
#: absolute floor of ``update_jump``: a step that moves the weights by less than 0.1% of their norm (the
#: healthy level is about 1e-3) is not dangerous, whatever it jumped from.
UPDATE_FLOOR = 1e-3

#: a layer's gradient norm relative to its weight norm below which the layer gets no usable gradient
#: (``grad_floor_layer``): an SGD step even at learning rate 0.1 then moves the weights by < 1e-7 of their
#: norm, the resolution of float32 (eps = 1.2e-7).
GRAD_WEIGHT_FLOOR = 1e-6
#: the mean surrogate derivative (``spiking/surrogate_grad``, in (0, 1]: the surrogates peak at 1 at the
#: threshold) below which the surrogate lets almost no gradient through (``surrogate_vanishing``)
SURROGATE_FLOOR = 5e-3
#: the largest pre-softmax attention logit (``attention/max_logit``) above which the attention logits are
#: growing out of control (``attention_logit_growth``). Healthy transformers of the issue's sweep stayed
#: <= 47 and the tiny decoder of tests/collectors/test_attention.py at lr 3e-2 <= 14.3; unstable runs pass
#: 100 on their way to 1e3-1e4 (Wortsman et al. 2023): 603 at step 10 at lr 1e-1 (docs/alerts.md).
ATTENTION_LOGIT_CEILING = 100.0
#: the smallest head's mean attention entropy (``attention/entropy_min``, nats) below which attention has
#: collapsed onto single keys (``attention_entropy_collapse``): about 99 % or more of a row's mass on one
#: key. Healthy runs >= 0.54 (issue's sweep), >= 0.56 (tiny decoder at lr 3e-2); collapsed <= 0.02.
ATTENTION_ENTROPY_FLOOR = 0.05
#: steps a spiking layer must stay > 95 % dead, without a break, for ``spiking_dead`` (a readout silent for a
#: few steps at the start of training, then firing, is not dead; a layer that never fires at all is
#: ``silent_layer``'s within 3 steps)
DEAD_STEPS = 10
#: a layer's typical firing rate below which ``spiking_rate_falling`` does not judge a fall (a fall of a
#: rate that was already below 1 % is the business of the dead / silent rules)
RATE_FLOOR = 1e-2
#: the gradient-explosion rules are quiet for `COOLDOWN` steps after a silent spiking layer starts firing again
#: (``silent_layer`` ends an episode): the gradient then rises back from almost nothing as neurons revive, a
#: recovery (the dead start of examples/snn_failures.py); the update-ratio and loss rules still watch the run
_REVIVAL = ("silent_layer",)

#: steps before a stream of a default rule may alert again after its last alert (every rule but
#: ``non_finite``). It never delays a first alert; it stops a condition that flaps around its threshold from
#: raising an alert and a recovery every few steps (measured on fault runs by
#: ``benchmarks/bench_alerts.py --only repeats``).
COOLDOWN = 100
#: calm observations that end an episode of a default rule watching a per-step metric (gradient norms, the
#: loss): one calm step inside a run of spikes is not a recovery. Rules on metrics measured every 10-100
#: steps (update ratio, activations, weight spectra) keep ``clear_after=1``: one calm measurement already
#: spans 10-100 steps.
CLEAR_AFTER = 5

_LR = "lower the learning rate (try ÷10) or add warm-up"
_QK = (
    "normalise queries and keys (qk-layernorm: a LayerNorm on q and k of each head), lower the peak learning "
    "rate or lengthen the warm-up"
)
_CLIP = "clip gradients (torch.nn.utils.clip_grad_norm_ at ~2× the typical norm)"


def default_rules(
    *, per_layer: bool = True, grad_floor: float | None = GRAD_FLOOR, update_floor: float | None = UPDATE_FLOOR
) -> list[Rule]:
    """A fresh instance of the default rules (each `Monitor` gets its own state).

    Every rule but ``non_finite`` has ``cooldown=COOLDOWN`` (steps); the rules on per-step metrics
    (gradient norms, the loss) end an episode after ``CLEAR_AFTER`` calm observations, the others after
    one. No default rule watches ``grad_condition``: the condition number of a batch gradient follows the
    batch size (its rank is at most B), so a jump of it says nothing about training (docs/alerts.md).

    Args:
        per_layer: include the per-layer rules (one state per layer).
        grad_floor: absolute floor of the relative gradient-explosion rules, global and per layer
            (`GRAD_FLOOR`; ``None``: purely relative).
        update_floor: absolute floor of the update-ratio jump rule (`UPDATE_FLOOR`; ``None``: none).

    Example:
        >>> [r.name for r in default_rules()][:4]
        ['non_finite', 'grad_explode', 'grad_rising', 'grad_vanish']
    """
    grad_floor = check_floor(grad_floor, "default_rules.grad_floor")
    update_floor = check_floor(update_floor, "default_rules.update_floor")
    rules: list[Rule] = [
        NonFiniteRule(),
        RatioRule(
            "grad_norm",
            factor=10.0,
            patience=2,
            instant_factor=50.0,
            window=50,
            min_history=10,
            floor=grad_floor,
            name="grad_explode",
            suppressed_by=_REVIVAL,
            suppress_for=COOLDOWN,
            cooldown=COOLDOWN,
            clear_after=CLEAR_AFTER,
            reason=R.EXPLODING_GRADIENT,
            severity=S.CRITICAL,
            suggestion=f"{_LR}; {_CLIP}; Monitor(guard=True) skips single bad steps",
        ),
        TrendRule(
            "grad_norm",
            window=100,
            factor=10.0,
            min_t=8.0,
            floor=grad_floor,
            name="grad_rising",
            suppressed_by=_REVIVAL,
            suppress_for=COOLDOWN,
            cooldown=COOLDOWN,
            clear_after=CLEAR_AFTER,
            reason=R.EXPLODING_GRADIENT,
            severity=S.WARNING,
            suggestion=f"gradients are growing steadily: {_LR}; {_CLIP}",
        ),
        RatioRule(
            "grad_norm",
            factor=1000.0,
            direction="down",
            window=50,
            min_history=10,
            name="grad_vanish",
            cooldown=COOLDOWN,
            clear_after=CLEAR_AFTER,
            reason=R.VANISHING_GRADIENT,
            severity=S.WARNING,
            suggestion="the gradient collapsed: look for saturated units (tanh/sigmoid tails, an "
            "over-confident softmax) or dead ReLUs; use He/Xavier init, normalisation, a lower learning rate",
        ),
        SustainedRule(
            "grad_norm",
            below=1e-8,
            patience=20,
            name="grad_tiny",
            cooldown=COOLDOWN,
            clear_after=CLEAR_AFTER,
            reason=R.VANISHING_GRADIENT,
            severity=S.WARNING,
            suggestion="there is (almost) no gradient: check the loss is connected to the parameters and "
            "not saturated; use He/Xavier init, normalisation, non-saturating activations",
        ),
        SpikeRule(
            "loss",
            z=6.0,
            patience=2,
            instant_z=10.0,
            window=100,
            warmup=20,
            min_ratio=3.0,
            name="loss_spike",
            cooldown=COOLDOWN,
            clear_after=CLEAR_AFTER,
            reason=R.LOSS_SPIKE,
            severity=S.WARNING,
            suggestion=f"{_LR}; {_CLIP}; look for a bad batch at this step",
        ),
        RatioRule(
            "loss",
            factor=10.0,
            patience=2,
            instant_factor=50.0,
            window=50,
            min_history=10,
            name="loss_jump",
            cooldown=COOLDOWN,
            clear_after=CLEAR_AFTER,
            reason=R.LOSS_SPIKE,
            severity=S.WARNING,
            suggestion="the loss jumped to many times its running median (a spike-count or other noisy loss "
            "included): did the learning rate change (scheduler, restart)? lower it; look for a bad batch",
        ),
        SustainedRule(
            "lyapunov",
            above=0.05,
            patience=10,
            name="chaotic",
            cooldown=COOLDOWN,
            reason=R.CHAOTIC_TRAINING,
            severity=S.WARNING,
            suggestion="nearby trajectories of training diverge: lower the learning rate, raise the "
            "batch size or add weight decay",
        ),
        RatioRule(
            "update_ratio",
            factor=10.0,
            patience=2,
            window=20,
            min_history=10,
            instant_factor=50.0,
            floor=update_floor,
            name="update_jump",
            cooldown=COOLDOWN,
            reason=R.UPDATE_RATIO,
            severity=S.WARNING,
            suggestion="the step size jumped: did the learning rate change (scheduler, restart, a "
            "loaded optimizer state)? lower it back or clip the update",
        ),
        ThresholdRule(
            "update_ratio",
            above=1.0,
            name="update_too_large",
            cooldown=COOLDOWN,
            reason=R.UPDATE_RATIO,
            severity=S.CRITICAL,
            suggestion="one step changed the weights by more than their own size: the learning rate is far too "
            "high (÷10 or more); check the scheduler and any loaded optimizer state",
        ),
        SustainedRule(
            "update_ratio",
            above=0.1,
            patience=3,
            name="update_ratio_high",
            cooldown=COOLDOWN,
            reason=R.UPDATE_RATIO,
            severity=S.WARNING,
            suggestion="each step changes the weights by >10% (practice: ~1e-3): lower the learning rate",
        ),
        SustainedRule(
            "update_ratio",
            below=1e-6,
            patience=10,
            name="update_ratio_low",
            cooldown=COOLDOWN,
            reason=R.UPDATE_RATIO,
            severity=S.INFO,
            suggestion="the weights barely move (practice: ~1e-3): raise the learning rate or check "
            "the optimizer holds the parameters",
        ),
        SustainedRule(
            "sharpness/eos_ratio",
            above=1.0,
            patience=3,
            within=4,
            name="edge_of_stability",
            cooldown=COOLDOWN,
            reason=R.THRESHOLD,
            severity=S.WARNING,
            suggestion="training is at or past the edge of stability (η·λ_max/2 > 1 for SGD, the "
            "preconditioned ratio for Adam): if the loss oscillates or spikes, lower the learning rate or add "
            "warm-up (docs/sharpness.md)",
        ),
        ThresholdRule(
            "attention/max_logit",
            above=ATTENTION_LOGIT_CEILING,
            clear=0.5 * ATTENTION_LOGIT_CEILING,
            name="attention_logit_growth",
            cooldown=COOLDOWN,
            reason=R.THRESHOLD,
            severity=S.WARNING,
            suggestion="the pre-softmax attention logits are growing out of control (Wortsman et al. 2023): "
            f"{_QK} (see the per-layer attention_layers/max_logit keys for where)",
        ),
        SustainedRule(
            "attention/entropy_min",
            below=ATTENTION_ENTROPY_FLOOR,
            patience=2,
            name="attention_entropy_collapse",
            cooldown=COOLDOWN,
            reason=R.THRESHOLD,
            severity=S.WARNING,
            suggestion="a head attends to a single key almost everywhere (attention entropy collapse, the "
            f"consequence of growing attention logits): {_QK}",
        ),
        SustainedRule(
            "spiking/surrogate_grad",
            below=SURROGATE_FLOOR,
            patience=1,
            name="surrogate_vanishing",
            cooldown=COOLDOWN,
            reason=R.VANISHING_GRADIENT,
            severity=S.WARNING,
            suggestion="the surrogate gradient lets almost nothing through (mean derivative < 0.005 of its "
            "peak): use a wider surrogate (a smaller slope), or bring the membranes near the threshold "
            "(input scaling, weight scale, threshold)",
        ),
    ]
    if per_layer:
        rules += [
            RatioRule(
                "layers:grad_norm",
                factor=10.0,
                patience=2,
                instant_factor=50.0,
                window=50,
                min_history=10,
                floor=grad_floor,
                name="grad_explode_layer",
                suppressed_by=_REVIVAL,
                suppress_for=COOLDOWN,
                cooldown=COOLDOWN,
                clear_after=CLEAR_AFTER,
                reason=R.EXPLODING_GRADIENT,
                severity=S.WARNING,
                suggestion=f"{_LR}; {_CLIP}; check this layer's init scale and normalisation",
            ),
            SustainedRule(
                "layers_rel:grad_norm",
                below=1e-3,
                patience=20,
                name="grad_vanish_layer",
                cooldown=COOLDOWN,
                clear_after=CLEAR_AFTER,
                reason=R.VANISHING_GRADIENT,
                severity=S.WARNING,
                suggestion="this layer's gradient is >1000× smaller than the typical layer's: use "
                "He/Xavier init, residual connections or normalisation; avoid saturating activations",
            ),
            SustainedRule(
                "layers:grad_norm",
                below=1e-30,
                patience=20,
                name="no_gradient_layer",
                cooldown=COOLDOWN,
                clear_after=CLEAR_AFTER,
                reason=R.SILENT_LAYER,
                severity=S.WARNING,
                suggestion="the layer receives exactly zero gradient: dead units upstream, a detached "
                "path, or frozen inputs",
            ),
            ThresholdRule(
                "layers:spectral_radius",
                above=1.0,
                clear=0.98,
                name="spectral_radius",
                cooldown=COOLDOWN,
                reason=R.SPECTRAL_RADIUS,
                severity=S.INFO,
                suggestion="ρ(W_hh) > 1: the recurrence linearised at h = 0 has a growing mode (small states "
                "grow until the nonlinearity saturates). This neither implies nor is needed for exploding "
                "gradients through time: their bound is ‖W_hh‖₂ (below 1, a tanh RNN's gradients through time "
                "cannot grow); for an LSTM/GRU gate block it bounds nothing. Watch the gradient alerts",
            ),
            ThresholdRule(
                "layers:spectral_radius",
                above=1.5,
                clear=1.4,
                name="spectral_radius_high",
                cooldown=COOLDOWN,
                reason=R.SPECTRAL_RADIUS,
                severity=S.WARNING,
                suggestion="the recurrent weights amplify small states strongly (a vanilla RNN with a random-like "
                "W_hh is then chaotic; gradients through time need not explode, see the gradient alerts): "
                "regularise W_hh (orthogonal init, spectral normalisation, weight decay), clip gradients, "
                "lower the learning rate",
            ),
            SustainedRule(
                "layers:dead_frac",
                above=0.9,
                patience=2,
                name="dead_neurons",
                cooldown=COOLDOWN,
                reason=R.DEAD_NEURONS,
                severity=S.WARNING,
                suggestion="most ReLU units output 0 for the whole batch: lower the learning rate, use "
                "LeakyReLU/GELU, He init, or a small positive bias",
            ),
            SustainedRule(
                "layers:saturated_frac",
                above=0.5,
                patience=2,
                name="saturated_neurons",
                cooldown=COOLDOWN,
                reason=R.SATURATED_NEURONS,
                severity=S.WARNING,
                suggestion="tanh/sigmoid units sit in their flat tails (no gradient): normalise inputs, "
                "use a smaller init scale (Xavier), lower the learning rate",
            ),
            RatioRule(
                "layers:activation_batch_std",
                factor=100.0,
                window=10,
                min_history=3,
                direction="down",
                name="collapse",
                cooldown=COOLDOWN,
                reason=R.COLLAPSE,
                severity=S.WARNING,
                suggestion="this layer's units stopped varying across the batch (every sample gets about the "
                "same output: representation collapse): lower the learning rate, add normalisation, check for "
                "dead units upstream",
            ),
            SustainedRule(
                "layers:dead_neuron_frac",
                above=0.95,
                patience=3,
                min_steps=DEAD_STEPS,
                name="spiking_dead",
                cooldown=COOLDOWN,
                reason=R.DEAD_NEURONS,
                severity=S.WARNING,
                suggestion="almost no neuron of this spiking layer fires: lower the threshold, raise the "
                "input gain or weight init scale, check the surrogate-gradient slope",
            ),
            SustainedRule(
                "layers:saturated_neuron_frac",
                above=0.5,
                patience=3,
                name="spiking_saturated",
                cooldown=COOLDOWN,
                reason=R.SATURATED_NEURONS,
                severity=S.WARNING,
                suggestion="most neurons fire at every time step (no information in the timing): raise "
                "the threshold or the leak, lower the weight scale, add a firing-rate regulariser",
            ),
            SustainedRule(
                "layers:firing_rate_mean",
                below=1e-4,
                patience=3,
                name="silent_layer",
                cooldown=COOLDOWN,
                reason=R.SILENT_LAYER,
                severity=S.WARNING,
                suggestion="the spiking layer is silent (no spikes, so no surrogate gradient flows): lower "
                "the threshold or raise the input scale",
            ),
            RatioRule(
                "layers:firing_rate_mean",
                factor=2.0,
                direction="down",
                window=50,
                min_history=20,
                floor=RATE_FLOOR,
                name="spiking_rate_falling",
                cooldown=COOLDOWN,
                reason=R.DEAD_NEURONS,
                severity=S.WARNING,
                suggestion="this spiking layer fires at less than half its own earlier rate (neurons are dying): "
                "look for what pushes it down (a drifting bias, weight decay, a too strong rate penalty); "
                "lower the threshold or add a firing-rate regulariser with a floor",
            ),
            SustainedRule(
                "layers:firing_rate_mean",
                above=0.4,
                patience=3,
                name="spiking_rate_high",
                cooldown=COOLDOWN,
                reason=R.SATURATED_NEURONS,
                severity=S.WARNING,
                suggestion="the spiking layer fires at more than 40 % of the time steps on average: raise the "
                "threshold, lower the input scaling or the weights, add leak (β < 1) or a firing-rate regulariser",
            ),
            SustainedRule(
                "layers:membrane_threshold_distance",
                below=0.0,
                patience=2,
                name="membrane_above_threshold",
                cooldown=COOLDOWN,
                reason=R.SATURATED_NEURONS,
                severity=S.WARNING,
                suggestion="the mean membrane potential sits above the firing threshold (the neurons fire at "
                "almost every step): raise the threshold, lower the input scaling, add leak (β < 1)",
            ),
            SustainedRule(
                "layers_ratio:grad_norm/weight_norm",
                below=GRAD_WEIGHT_FLOOR,
                patience=3,
                name="grad_floor_layer",
                cooldown=COOLDOWN,
                reason=R.VANISHING_GRADIENT,
                severity=S.WARNING,
                suggestion="this layer's gradient is < 1e-6 of its weights (no SGD step can move them): in a "
                "spiking network a too steep surrogate or silent / saturated neurons after it; otherwise "
                "saturated units or a detached path",
            ),
        ]
    return rules
