//! Fleet keys, the device's trust store, and the signatures on bundles and orders.
//!
//! One ed25519 key pair signs both the bundles (the signature of the bundle digest that the
//! `.scb` format keeps outside that digest) and the orders that change a device's state.
//! A device trusts the public keys in its trust store directory, one `*.pub` file each.
//!
//! Key files are text: comment lines start with `#`, and the first other line is the key
//! in hex (the 32-byte secret seed in `NAME.key`, the 32-byte public key in `NAME.pub`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand::RngCore;
use selfclass_runtime::bundle::{self, Bundle};

use super::error::{Result, UpdateError, LOCAL};
use super::protocol::{Order, SignedOrder, ORDER_DOMAIN};
use super::{hex, parse_hex32};

/// A fleet signing key, loaded from its secret file.
pub struct FleetKey {
    signing: SigningKey,
}

impl std::fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FleetKey({})", key_id(&self.public_key()))
    }
}

impl FleetKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> FleetKey {
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        FleetKey { signing: SigningKey::from_bytes(&seed) }
    }

    /// A key from its 32-byte secret seed (tests build fixed keys this way).
    pub fn from_seed(seed: [u8; 32]) -> FleetKey {
        FleetKey { signing: SigningKey::from_bytes(&seed) }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Reads a secret key file written by [`FleetKey::save`].
    pub fn load(path: &Path) -> Result<FleetKey> {
        if read_key_kind(path)? == KeyKind::Public {
            return Err(UpdateError::key(
                LOCAL,
                path,
                format!(
                    "is a public key; sign with the secret key written beside it ({})",
                    path.with_extension("key").display()
                ),
            ));
        }
        let seed = read_key_file(path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        "secret key {} is readable by other users; chmod 600 it",
                        path.display()
                    );
                }
            }
        }
        Ok(FleetKey { signing: SigningKey::from_bytes(&seed) })
    }

    /// Writes `PREFIX.key` (secret, mode 0600) and `PREFIX.pub`, refusing to overwrite an
    /// existing key: losing a fleet key locks every device out of updates.
    pub fn save(&self, prefix: &Path) -> Result<(PathBuf, PathBuf)> {
        let secret_path = prefix.with_extension("key");
        let public_path = prefix.with_extension("pub");
        if let Some(dir) = prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)
                .map_err(|e| UpdateError::io(LOCAL, "creating the key directory", dir, e))?;
        }
        for path in [&secret_path, &public_path] {
            if path.exists() {
                return Err(UpdateError::key(
                    LOCAL,
                    path,
                    "exists already; remove it first or choose another name",
                ));
            }
        }
        let id = key_id(&self.public_key());
        let secret = format!(
            "# selfclass fleet signing key {id} (ed25519 secret seed). Keep it private.\n{}\n",
            hex(&self.signing.to_bytes())
        );
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options
            .open(&secret_path)
            .map_err(|e| UpdateError::io(LOCAL, "creating secret key", &secret_path, e))?;
        file.write_all(secret.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| UpdateError::io(LOCAL, "writing secret key", &secret_path, e))?;
        let public = format!(
            "# selfclass fleet public key {id}: copy into each device's trust store\n{}\n",
            hex(&self.public_key())
        );
        fs::write(&public_path, public)
            .map_err(|e| UpdateError::io(LOCAL, "writing public key", &public_path, e))?;
        Ok((secret_path, public_path))
    }

    /// Signs an order for a device.
    pub fn sign_order(&self, order: &Order) -> Result<SignedOrder> {
        let bytes = postcard::to_allocvec(order)
            .map_err(|e| UpdateError::protocol(&order.device, format!("encoding an order: {e}")))?;
        let signature = self.signing.sign(&order_message(&bytes));
        Ok(SignedOrder {
            order: bytes,
            public_key: self.public_key(),
            signature: signature.to_bytes().to_vec(),
        })
    }

    /// Sets the bundle's version and signs its digest. Versions only go up: a version
    /// below the one the bundle already carries is refused.
    pub fn sign_bundle(&self, bundle: &mut Bundle, version: u64, origin: &str) -> Result<()> {
        if version == 0 || version < bundle.model_version {
            return Err(UpdateError::refused(
                LOCAL,
                format!("signing {origin} as version {version}"),
                format!(
                    "the bundle already carries version {}; versions only go up (and start at 1)",
                    bundle.model_version
                ),
            ));
        }
        bundle.model_version = version;
        bundle.signature = None;
        let digest = bundle.digest().map_err(|e| UpdateError::runtime(LOCAL, e))?;
        let signature = self.signing.sign(&digest);
        bundle.signature = Some(bundle::Signature {
            public_key: self.public_key(),
            signature: signature.to_bytes(),
        });
        Ok(())
    }
}

/// A short name for a public key: its first eight bytes in hex.
pub fn key_id(public_key: &[u8; 32]) -> String {
    hex(&public_key[..8])
}

fn order_message(order_bytes: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(ORDER_DOMAIN.len() + order_bytes.len());
    message.extend_from_slice(ORDER_DOMAIN);
    message.extend_from_slice(order_bytes);
    message
}

/// What a key file says it holds, by the comment [`FleetKey::save`] writes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Secret,
    Public,
    Unknown,
}

fn read_key_kind(path: &Path) -> Result<KeyKind> {
    let text =
        fs::read_to_string(path).map_err(|e| UpdateError::io(LOCAL, "reading key", path, e))?;
    let header = text.lines().next().unwrap_or_default();
    Ok(if header.contains("fleet public key") {
        KeyKind::Public
    } else if header.contains("fleet signing key") {
        KeyKind::Secret
    } else {
        KeyKind::Unknown
    })
}

fn read_key_file(path: &Path) -> Result<[u8; 32]> {
    let text =
        fs::read_to_string(path).map_err(|e| UpdateError::io(LOCAL, "reading key", path, e))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| UpdateError::key(LOCAL, path, "holds no key line"))?;
    parse_hex32(line)
        .ok_or_else(|| UpdateError::key(LOCAL, path, "the key line is not 64 hexadecimal digits"))
}

/// The public keys a device accepts bundles and orders from.
#[derive(Debug, Clone)]
pub struct TrustStore {
    dir: PathBuf,
    keys: Vec<VerifyingKey>,
}

impl TrustStore {
    /// Reads every `*.pub` file of `dir`. An empty store is an error: such a device could
    /// never accept an update, which is better said at start than at the first push.
    pub fn load(dir: &Path, device: &str) -> Result<TrustStore> {
        let entries = fs::read_dir(dir)
            .map_err(|e| UpdateError::io(device, "reading trust store", dir, e))?;
        let mut keys = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| UpdateError::io(device, "listing", dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pub") {
                continue;
            }
            if read_key_kind(&path).map_err(|e| relabel(e, device))? == KeyKind::Secret {
                // A secret key here would be a leak, and would trust the wrong key.
                return Err(UpdateError::key(
                    device,
                    &path,
                    "is a fleet secret (signing) key; put the matching .pub file in the trust store and keep the secret key off the device",
                ));
            }
            let bytes = read_key_file(&path).map_err(|e| relabel(e, device))?;
            let key = VerifyingKey::from_bytes(&bytes)
                .map_err(|e| UpdateError::key(device, &path, format!("not an ed25519 key: {e}")))?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(UpdateError::key(
                device,
                dir,
                "the trust store holds no *.pub key; this device could accept no update",
            ));
        }
        Ok(TrustStore { dir: dir.to_path_buf(), keys })
    }

    /// A store of the given keys (tests, and agents embedding their keys).
    pub fn from_keys(keys: &[[u8; 32]], device: &str) -> Result<TrustStore> {
        let keys = keys
            .iter()
            .map(|k| {
                VerifyingKey::from_bytes(k).map_err(|e| {
                    UpdateError::key(device, "<memory>", format!("not an ed25519 key: {e}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TrustStore { dir: PathBuf::from("<memory>"), keys })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn find(&self, public_key: &[u8; 32]) -> Option<&VerifyingKey> {
        self.keys.iter().find(|k| k.as_bytes() == public_key)
    }

    /// Checks a bundle's signature. The errors say which of unsigned, untrusted key, or
    /// signature not matching the content (tampered after signing) it was.
    pub fn verify_bundle(&self, bundle: &Bundle, device: &str, what: &str) -> Result<()> {
        let Some(sig) = &bundle.signature else {
            return Err(UpdateError::refused(
                device,
                what,
                "the bundle is unsigned; sign it with `fleet sign`",
            ));
        };
        let Some(key) = self.find(&sig.public_key) else {
            return Err(UpdateError::refused(
                device,
                what,
                format!(
                    "signed by key {}, which is not in the trust store {}",
                    key_id(&sig.public_key),
                    self.dir.display()
                ),
            ));
        };
        let digest = bundle.digest().map_err(|e| UpdateError::runtime(device, e))?;
        key.verify_strict(&digest, &Signature::from_bytes(&sig.signature)).map_err(|_| {
            UpdateError::refused(
                device,
                what,
                format!(
                    "the signature of key {} does not match the bundle's content: it was changed after signing",
                    key_id(&sig.public_key)
                ),
            )
        })
    }

    /// Checks an order's signature and decodes it. Nonce, time and device name are the
    /// caller's to check.
    pub fn open_order(&self, signed: &SignedOrder, device: &str) -> Result<Order> {
        let what = "order";
        let key = self.find(&signed.public_key).ok_or_else(|| {
            UpdateError::refused(
                device,
                what,
                format!(
                    "signed by key {}, which is not in the trust store {}",
                    key_id(&signed.public_key),
                    self.dir.display()
                ),
            )
        })?;
        let signature: [u8; 64] = signed.signature.as_slice().try_into().map_err(|_| {
            UpdateError::refused(
                device,
                what,
                format!("a signature of {} bytes", signed.signature.len()),
            )
        })?;
        key.verify_strict(&order_message(&signed.order), &Signature::from_bytes(&signature))
            .map_err(|_| {
                UpdateError::refused(device, what, "the signature does not match the order")
            })?;
        postcard::from_bytes(&signed.order).map_err(|e| {
            UpdateError::protocol(device, format!("a signed order does not decode: {e}"))
        })
    }
}

/// Re-labels an error about a key file with the device that read it.
fn relabel(error: UpdateError, device: &str) -> UpdateError {
    match error {
        UpdateError::Key { path, reason, .. } => UpdateError::key(device, path, reason),
        UpdateError::Io { action, path, cause, .. } => UpdateError::io(device, action, path, cause),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::protocol::Action;

    fn order(device: &str) -> Order {
        Order {
            device: device.into(),
            nonce: [7; 32],
            issued_unix_ms: 1,
            action: Action::Rollback { reason: "test".into() },
        }
    }

    #[test]
    fn keys_are_saved_into_a_new_folder_and_swapped_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = FleetKey::from_seed([3; 32]);
        let (secret, public) = key.save(&dir.path().join("keys/ops")).expect("save");
        assert_eq!(FleetKey::load(&secret).expect("load").public_key(), key.public_key());

        // The public key given where the secret one belongs.
        let err = FleetKey::load(&public).unwrap_err().to_string();
        assert!(err.contains("is a public key") && err.contains("ops.key"), "{err}");

        // The secret key copied into a trust store under a .pub name.
        let trust = dir.path().join("trust");
        fs::create_dir_all(&trust).expect("mkdir");
        fs::copy(&secret, trust.join("ops.pub")).expect("copy");
        let err = TrustStore::load(&trust, "cam-1").unwrap_err().to_string();
        assert!(err.contains("secret (signing) key"), "{err}");
        fs::copy(&public, trust.join("ops.pub")).expect("copy");
        assert!(TrustStore::load(&trust, "cam-1").is_ok());
    }

    #[test]
    fn a_signed_order_opens_with_the_trusted_key_only() {
        let key = FleetKey::from_seed([1; 32]);
        let other = FleetKey::from_seed([2; 32]);
        let trust = TrustStore::from_keys(&[key.public_key()], "cam").expect("trust");
        let signed = key.sign_order(&order("cam")).expect("sign");
        assert_eq!(trust.open_order(&signed, "cam").expect("open"), order("cam"));

        let foreign = other.sign_order(&order("cam")).expect("sign");
        let err = trust.open_order(&foreign, "cam").unwrap_err().to_string();
        assert!(err.contains("not in the trust store"), "{err}");

        let mut altered = signed.clone();
        let last = altered.order.len() - 1;
        altered.order[last] ^= 1;
        let err = trust.open_order(&altered, "cam").unwrap_err().to_string();
        assert!(err.contains("does not match the order"), "{err}");
    }

    #[test]
    fn key_files_round_trip_and_are_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = FleetKey::generate();
        let (secret, public) = key.save(&dir.path().join("fleet")).expect("save");
        let back = FleetKey::load(&secret).expect("load");
        assert_eq!(back.public_key(), key.public_key());
        let trust = TrustStore::load(dir.path(), "cam").expect("trust");
        assert!(trust.find(&key.public_key()).is_some());
        assert!(public.exists());
        let err = key.save(&dir.path().join("fleet")).unwrap_err().to_string();
        assert!(err.contains("exists already"), "{err}");
    }
}
