//! Wire protocol spoken between ferry and its guest agent over vsock.
