//! Holds what roster knows about identity users (`@nova-*`) from lifecycle events.
//!
//! Pure like the rest of `model`: the lifecycle consumer feeds it, the reconciler reads it.
//! A deactivated user is never invited or rejoined by drift repair.

use std::collections::HashSet;

use ruma::{OwnedUserId, UserId};

#[derive(Debug, Default, Clone)]
pub struct Identities {
    deactivated: HashSet<OwnedUserId>,
}

impl Identities {
    /// Records that `user` was deactivated; returns whether this is news.
    pub fn mark_deactivated(&mut self, user: OwnedUserId) -> bool {
        self.deactivated.insert(user)
    }

    pub fn is_deactivated(&self, user: &UserId) -> bool {
        self.deactivated.contains(user)
    }

    pub fn deactivated_count(&self) -> usize {
        self.deactivated.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::owned_user_id;

    #[test]
    fn should_remember_a_deactivation_once() {
        let mut ids = Identities::default();
        let user = owned_user_id!("@nova-1:example.org");
        assert!(!ids.is_deactivated(&user));
        assert!(ids.mark_deactivated(user.clone()));
        assert!(!ids.mark_deactivated(user.clone()));
        assert!(ids.is_deactivated(&user));
        assert_eq!(ids.deactivated_count(), 1);
    }
}
