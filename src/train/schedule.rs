//! The EDM2 learning-rate schedule (paper Eq. 57 with a linear ramp-up; DESIGN.md §2).

/// `lr = ref_lr / sqrt(max(t / (ref_batches·batch), 1)) · min(t / (rampup_Mimg·10⁶), 1)`
/// with `t` = images seen *before* this step; `ref_batches` = 0 turns the decay off and
/// `rampup_mimg` = 0 the ramp.
pub fn learning_rate(cur_nimg: f64, batch_size: f64, ref_lr: f64, ref_batches: f64, rampup_mimg: f64) -> f64 {
    let mut lr = ref_lr;
    if ref_batches > 0.0 {
        lr /= (cur_nimg / (ref_batches * batch_size)).max(1.0).sqrt();
    }
    if rampup_mimg > 0.0 {
        lr *= (cur_nimg / (rampup_mimg * 1e6)).min(1.0);
    }
    lr
}
