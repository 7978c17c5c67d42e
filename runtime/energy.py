"""Energy per inference of a profiled SNN on a hardware profile, beside the same network as an ANN.

SNN, per inference (one sample, all T steps), on an event-driven profile:

    E_snn = Effective_ACs x e_synop + Effective_MACs x e_mac        (synaptic layers)
          + neurons x T x e_neuron_update + spikes x e_spike        (LIF layers)
          + static_power x time_step x T                            (when the profile has both)

On a profile that is not event-driven (CPU, GPU) every connection is computed every step:
the synaptic term becomes Dense x T x e_mac (identity shortcuts: x e_synop).
A profile without e_mac leaves Effective_MACs uncosted (`uncosted_macs`; e.g. a first layer fed
event-count frames on Loihi 1, which has no graded inputs: assumed encoded off-chip).

ANN: the same graph with LIF replaced by a non-spiking activation, counted as dense MACs of the
same profile (identity shortcuts as adds, at e_synop). Two references, both reported:
- one pass: a frame-based ANN classifying once (dense connections x e_mac), the usual comparison;
- T passes: an ANN run on each of the T frames, as a frame-by-frame video model would.
Activations, pooling, memory traffic and static power are not counted on the ANN side.
`ann_over_snn_*` > 1 means the SNN uses less energy.
"""

from __future__ import annotations

from dataclasses import dataclass

from tmkt.hw_profiles import HwProfile
from tmkt.runtime.profiler import Profile, SynapticLayer

__all__ = ["EnergyEstimate", "estimate_energy"]


@dataclass(frozen=True)
class EnergyEstimate:
    """Energy per inference in pJ on one profile (see the module docstring for the model)."""

    hw: HwProfile
    per_layer_pj: dict[str, float]  # synaptic and LIF layers, graph order
    synops_pj: float  # effective ACs (event-driven) or dense synaptic work (not event-driven)
    macs_pj: float  # effective MACs that could be costed
    neurons_pj: float
    spikes_pj: float
    static_pj: float
    uncosted_macs: float  # effective MACs per inference with no e_mac in the profile
    ann_one_pass_pj: float | None
    ann_t_passes_pj: float | None

    @property
    def total_pj(self) -> float:
        return self.synops_pj + self.macs_pj + self.neurons_pj + self.spikes_pj + self.static_pj

    @property
    def ann_over_snn_one_pass(self) -> float | None:
        return None if self.ann_one_pass_pj is None or self.total_pj == 0 else self.ann_one_pass_pj / self.total_pj

    @property
    def ann_over_snn_t_passes(self) -> float | None:
        return None if self.ann_t_passes_pj is None or self.total_pj == 0 else self.ann_t_passes_pj / self.total_pj


def estimate_energy(profile: Profile, hw: HwProfile) -> EnergyEstimate:
    """Energy per inference of `profile` on `hw` (pJ)."""
    per_layer: dict[str, float] = {}
    synops = macs = neurons = spikes = uncosted = 0.0
    T = profile.timesteps
    for layer in profile.layers:
        if isinstance(layer, SynapticLayer):
            add_cost = hw.e_synop_pj if layer.op == "Identity" else hw.e_mac_pj
            if not hw.event_driven:
                # dense execution: every connection, every step, spikes or not
                e = layer.dense_per_step * T * add_cost  # type: ignore[operator]  # e_mac is required here
                synops += e
            else:
                ops = profile.per_inference(layer.ops)
                if layer.binary:
                    e = ops * hw.e_synop_pj
                    synops += e
                elif hw.e_mac_pj is not None:
                    e = ops * hw.e_mac_pj
                    macs += e
                else:
                    e = 0.0
                    uncosted += ops
            per_layer[layer.name] = e
        else:  # NeuronLayer
            e_upd = layer.neurons * T * hw.e_neuron_update_pj
            e_spk = profile.per_inference(layer.spikes) * (hw.e_spike_pj or 0.0)
            neurons += e_upd
            spikes += e_spk
            per_layer[layer.name] = e_upd + e_spk
    static = 0.0
    if hw.static_power_mw is not None and hw.time_step_us is not None:
        static = hw.static_power_mw * hw.time_step_us * T * 1e3  # 1 mW x 1 us = 1e-9 J = 1e3 pJ
    ann_one = None
    if hw.e_mac_pj is not None:
        ann_one = sum(
            s.dense_per_step * (hw.e_synop_pj if s.op == "Identity" else hw.e_mac_pj) for s in profile.synaptic
        )
    return EnergyEstimate(
        hw=hw,
        per_layer_pj=per_layer,
        synops_pj=synops,
        macs_pj=macs,
        neurons_pj=neurons,
        spikes_pj=spikes,
        static_pj=static,
        uncosted_macs=uncosted,
        ann_one_pass_pj=ann_one,
        ann_t_passes_pj=None if ann_one is None else ann_one * T,
    )
