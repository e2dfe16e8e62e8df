//! The initramfs ferry writes for each VM: the guest agent as /init plus its config.
