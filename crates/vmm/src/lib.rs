//! The ferry virtual machine monitor.
