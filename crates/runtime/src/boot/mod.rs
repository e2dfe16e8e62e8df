//! Booting a VM: the policy above the VM handle. A boot restores the boot
//! template of its shape when there is one (see [`crate::template`]), and
//! otherwise boots the kernel.

use std::sync::Arc;

use ferry_protocol::config::{AgentConfig, MainCommand};
use ferry_protocol::{Session, Token};

pub mod spec;

pub use spec::{kernel_for, BootSpec};

use crate::config::Config;
use crate::error::Coded;
use crate::images;
use crate::machine::{random_hex, BootError, Machine, DEFAULT_CPUS, DEFAULT_MEMORY_MIB};
use crate::plan::Launch;
use crate::vm::record::{self, VmRecord};
use crate::vm::Registry;

/// Creates and starts a VM, returning once its guest agent answers.
pub fn boot(config: &Arc<Config>, spec: &BootSpec) -> Result<Machine, BootError> {
    if crate::template::ineligible(spec).is_none() && crate::template::any(&config.dirs) {
        if let Some(m) = boot_from_template(config, spec)? {
            return Ok(m);
        }
    }
    boot_cold(config, spec)
}

/// A VM name: the one asked for, or a new random one.
fn name_for(spec: &BootSpec) -> Result<String, BootError> {
    match &spec.name {
        Some(n) => Ok(n.clone()),
        None => Ok(format!("vm-{}", random_hex(3)?)),
    }
}

/// Restores the boot template matching `spec`, if there is one. A template
/// that fails to restore is deleted and `None` returned, so the caller boots
/// a kernel instead.
fn boot_from_template(config: &Arc<Config>, spec: &BootSpec) -> Result<Option<Machine>, BootError> {
    let mut phases = crate::progress::Phases::from_env();
    let (key, image) = crate::template::key_for(config, spec)?;
    let Some(template) = crate::template::find(&config.dirs, &key) else {
        return Ok(None);
    };
    let command = spec.command.clone().or_else(|| {
        spec.run_image_command
            .then(|| image.config.cmd.clone())
            .flatten()
    });
    let mounts = crate::mounts::prepare(&spec.mounts)?;
    let name = name_for(spec)?;
    phases.mark("template found");
    let rs = crate::snapshot::restore::RestoreSpec {
        name: Some(name.clone()),
        ports: Some(spec.ports.clone()),
        hostname: Some(name.clone()),
        // This host made the template: its record asks for nothing.
        trust_bundle_config: true,
        ..crate::snapshot::restore::RestoreSpec::new(template.path.clone())
    };
    let restored = crate::snapshot::restore::restore_as(config, &rs, |rec| {
        rec.image = image.description.clone();
        rec.ephemeral = spec.ephemeral;
        rec.mounts = mounts.clone();
        rec.command = command.clone();
        rec.exec_defaults = image.exec_defaults.then(|| image.config.exec_defaults());
    });
    let machine = match restored {
        Ok(m) => m,
        Err(crate::snapshot::restore::RestoreError::Boot(e))
            if matches!(e.code(), "VM_NAME_TAKEN" | "BOOT_PORT_FORWARD_IN_USE") =>
        {
            return Err(e)
        }
        Err(e) => {
            tracing::warn!(
                "boot template {} does not restore ({}: {e}); deleting it and booting the kernel",
                template.id,
                e.code()
            );
            crate::template::remove(&config.dirs, &template.id);
            return Ok(None);
        }
    };
    phases.mark("restored from template");
    let started = (|| -> Result<(), BootError> {
        let client = machine.client();
        crate::mounts::copy_in(&client, &mounts)?;
        // Last, as a kernel boot starts it: once everything else is in place.
        if let Some(argv) = command {
            let mut env = image.config.env.clone();
            env.extend(spec.env.clone());
            let main = MainCommand {
                argv,
                env,
                workdir: spec.workdir.clone().or(image.config.workdir.clone()),
                user: image.config.user.clone(),
            };
            client.start_main(&main).map_err(|e| BootError::Vmm {
                code: "BOOT_MAIN_FAILED".into(),
                message: format!("the main command did not start: {e}"),
                hint: Some("check the command and its working directory in the image".into()),
            })?;
        }
        Ok(())
    })();
    if let Err(e) = started {
        let _ = machine.remove();
        return Err(e);
    }
    phases.mark("mounts and main command");
    Ok(Some(machine))
}

/// Boots a kernel: [`boot`] without templates.
fn boot_cold(config: &Arc<Config>, spec: &BootSpec) -> Result<Machine, BootError> {
    let mut phases = crate::progress::Phases::from_env();
    let image = images::resolve(config, spec.image.as_deref())?;
    let kernel = kernel_for(config, spec)?;
    let agent = crate::config::locate_agent(config)?;
    // Checked before anything is created: a missing VMM fails the boot at once.
    crate::config::locate_vmm(config)?;
    let mounts = crate::mounts::prepare(&spec.mounts)?;
    if spec.net {
        crate::net::find_passt()?;
    }
    let registry = Registry::new(&config.dirs);
    // A taken host port fails the boot before anything is created; the
    // VMM binds for real and reports the same error if it loses a race.
    crate::forward::check_available(&spec.ports, &registry)?;
    let token = Token::generate().map_err(|e| BootError::Prepare(format!("token: {e}")))?;
    let name = name_for(spec)?;
    let command = spec.command.clone().or_else(|| {
        spec.run_image_command
            .then(|| image.config.cmd.clone())
            .flatten()
    });
    let idle = command.is_none();
    let id = random_hex(8)?;
    let record = VmRecord {
        net: spec.net.then(|| crate::net::NetSettings::for_vm(&id)),
        ports: spec.ports.clone(),
        name: name.clone(),
        id,
        created_at: record::now(),
        cpus: spec.cpus.unwrap_or(DEFAULT_CPUS),
        memory_mib: spec.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
        kernel,
        image: image.description.clone(),
        command: command.clone(),
        token: token.as_hex().to_string(),
        ephemeral: spec.ephemeral,
        mounts: mounts.clone(),
        exec_defaults: image.exec_defaults.then(|| image.config.exec_defaults()),
    };
    let (dir, owner) = registry.create(&record)?;
    let machine = Machine {
        record,
        dir,
        config: Arc::clone(config),
        owner: Some(Arc::new(owner)),
    };
    let started = (|| {
        ferry_disk::create_layer(&machine.dir.root_disk(), &image.ext4, None)
            .map_err(|e| BootError::Prepare(format!("root disk: {e}")))?;
        let mut env = image.config.env.clone();
        env.extend(spec.env.clone());
        let agent_config = AgentConfig {
            command: command.map(|argv| MainCommand {
                argv,
                env,
                workdir: spec.workdir.clone().or(image.config.workdir.clone()),
                user: image.config.user.clone(),
            }),
            hostname: name.clone(),
            mounts: crate::mounts::agent_mounts(&mounts),
            network: machine
                .record
                .net
                .as_ref()
                .map(crate::net::NetSettings::agent_config),
            ..AgentConfig::new(&token)
        };
        crate::initramfs::write_initramfs(&agent, &agent_config, &machine.dir.initramfs())
            .map_err(|e| BootError::Prepare(format!("initramfs: {e}")))?;
        phases.mark("prepare (image, disk layer, initramfs)");
        machine.spawn_vmm(Launch::Boot {
            initramfs: machine.dir.initramfs(),
        })?;
        phases.mark("VMM up");
        let r = machine.wait_for_agent();
        phases.mark("agent answers");
        let session = r?;
        crate::mounts::copy_in(&machine.client(), &mounts)?;
        if idle {
            warm_page_cache(&session);
            phases.mark("page cache warmed");
        }
        Ok(())
    })();
    if let Err(e) = started {
        let _ = machine.clone().remove();
        return Err(e);
    }
    // An ephemeral VM lives only as long as this process holds it.
    if !spec.ephemeral {
        machine.release();
    }
    Ok(machine)
}

/// Boots a VM of `spec`'s shape with nothing to run and saves it as the
/// template for that shape (replacing an older one). The VM is gone afterwards.
pub fn create_template(
    config: &Arc<Config>,
    spec: &BootSpec,
) -> Result<crate::template::TemplateInfo, BootError> {
    if let Some(why) = crate::template::ineligible(spec) {
        return Err(BootError::Prepare(format!(
            "templates are made of plain boots ({why})"
        )));
    }
    let (key, image) = crate::template::key_for(config, spec)?;
    let id = key.id();
    let dir = config.dirs.templates();
    std::fs::create_dir_all(&dir)
        .map_err(|e| BootError::Prepare(format!("create {}: {e}", dir.display())))?;
    let plain = BootSpec {
        name: Some(format!("template-{id}")),
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        kernel: spec.kernel.clone(),
        image: spec.image.clone(),
        cold: true,
        ephemeral: true,
        ..BootSpec::default()
    };
    // A boot without a command warms the guest's page cache (loader, libc,
    // shell) before it returns, so the template carries it.
    let machine = boot(config, &plain)?;
    let path = crate::template::bundle_path(&config.dirs, &id);
    let saved = machine.snapshot_to_path(
        &path,
        &crate::machine::SnapshotOptions {
            leave_running: false,
            thin: true,
            // A template never leaves this host and is restored on every
            // boot of its shape: raw memory is mapped from the file as the
            // guest touches it, where compressed memory must be decoded and
            // copied in page fault by page fault (an idle 512 MiB guest
            // answered in about 0.1 s against 0.5 s after its VMM was up).
            raw_memory: true,
            compact: false,
            since: None,
        },
    );
    let _ = machine.remove();
    saved.map_err(|e| BootError::Vmm {
        code: e.code().to_string(),
        message: e.to_string(),
        hint: e.hint(),
    })?;
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let info = crate::template::TemplateInfo {
        id: id.clone(),
        key,
        image: image.description,
        created_at: record::now(),
        bytes,
        path,
    };
    record::write_json(&crate::template::info_path(&config.dirs, &id), &info)
        .map_err(|e| BootError::Prepare(format!("write template record: {e}")))?;
    Ok(info)
}

/// Runs one short dynamically linked command in a VM that booted without a
/// command, so that its first command, and the first command of every fork,
/// snapshot and template made of it, finds the loader, libc and the shell in
/// the guest's page cache instead of reading them from disk (about half of a
/// first `exec` after a fork under emulation). Best effort: an image without
/// a shell boots all the same.
fn warm_page_cache(session: &Session) {
    let req = ferry_protocol::ExecRequest::new(["/bin/sh", "-c", ":"]);
    if let Err(e) = session.output(req, None) {
        tracing::debug!("warming the guest's page cache: {e}");
    }
}
