//! Linux's `arm_smmu_write_entry()`: updating a live STE or CD so that the SMMU, which may
//! fetch it at any moment, only ever sees the old or the new configuration where possible.

/// An STE or CD: eight little-endian qwords.
pub type Entry = [u64; 8];

/// `NUM_ENTRY_QWORDS`.
pub const NUM_ENTRY_QWORDS: usize = 8;

/// Which update `arm_smmu_write_entry()` chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateKind {
    /// No used bit changes: only unused bits are written.
    Unused,
    /// Exactly one qword's used bits change: unused bits first, then the critical qword, then
    /// the clean-up. The SMMU never sees a broken entry.
    Hitless {
        /// The qword whose write switches configurations.
        critical: usize,
    },
    /// Several qwords' used bits change: V = 0 first, then the body, then qword 0.
    Breaking,
}

/// One `entry_set()` that changed something: the qwords it writes, in order. The writer
/// syncs (CFGI + CMD_SYNC) after each step.
pub type Step = Vec<(usize, u64)>;

/// The plan for one update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdatePlan {
    /// The strategy.
    pub kind: UpdateKind,
    /// The writes, grouped by sync.
    pub steps: Vec<Step>,
}

/// `entry_set()`: copies `target[start..start + len]` into `cur`, recording what changed.
fn entry_set(cur: &mut Entry, target: &Entry, start: usize, len: usize, steps: &mut Vec<Step>) {
    let mut step = Step::new();
    for (i, (c, t)) in cur
        .iter_mut()
        .zip(target.iter())
        .enumerate()
        .skip(start)
        .take(len)
    {
        if *c != *t {
            *c = *t;
            step.push((i, *t));
        }
    }
    if !step.is_empty() {
        steps.push(step);
    }
}

/// `arm_smmu_entry_qword_diff()`: the qwords whose used bits must change, and the entry with
/// every currently unused bit already set to its target value.
pub fn qword_diff(entry: &Entry, target: &Entry, used: fn(&Entry) -> Entry) -> (u8, Entry) {
    let cur_used = used(entry);
    let target_used = used(target);
    let mut unused_update = [0u64; NUM_ENTRY_QWORDS];
    let mut diff = 0u8;
    for (i, slot) in unused_update.iter_mut().enumerate() {
        let (e, t) = (entry.get(i).copied(), target.get(i).copied());
        let (cu, tu) = (cur_used.get(i).copied(), target_used.get(i).copied());
        let (Some(e), Some(t), Some(cu), Some(tu)) = (e, t, cu, tu) else {
            continue;
        };
        *slot = (e & cu) | (t & !cu);
        if (*slot & tu) != t {
            diff |= 1u8.checked_shl(i as u32).unwrap_or(0);
        }
    }
    (diff, unused_update)
}

/// Plans `arm_smmu_write_entry(entry → target)` with the entry type's used-bits function.
pub fn plan_update(entry: &Entry, target: &Entry, used: fn(&Entry) -> Entry) -> UpdatePlan {
    let (diff, mut unused_update) = qword_diff(entry, target, used);
    let mut cur = *entry;
    let mut steps = Vec::new();
    let kind = if diff.count_ones() == 1 {
        let critical = diff.trailing_zeros() as usize;
        if let (Some(slot), Some(&old)) = (unused_update.get_mut(critical), entry.get(critical)) {
            *slot = old;
        }
        entry_set(&mut cur, &unused_update, 0, NUM_ENTRY_QWORDS, &mut steps);
        entry_set(&mut cur, target, critical, 1, &mut steps);
        entry_set(&mut cur, target, 0, NUM_ENTRY_QWORDS, &mut steps);
        UpdateKind::Hitless { critical }
    } else if diff != 0 {
        unused_update[0] = 0;
        entry_set(&mut cur, &unused_update, 0, 1, &mut steps);
        entry_set(
            &mut cur,
            target,
            1,
            NUM_ENTRY_QWORDS.saturating_sub(1),
            &mut steps,
        );
        entry_set(&mut cur, target, 0, 1, &mut steps);
        UpdateKind::Breaking
    } else {
        entry_set(&mut cur, target, 0, NUM_ENTRY_QWORDS, &mut steps);
        UpdateKind::Unused
    };
    UpdatePlan { kind, steps }
}
