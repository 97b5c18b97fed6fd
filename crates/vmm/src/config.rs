//! What a VM is made of: the configuration of crate `wv-config` (the one type the command
//! line, the daemon and the VMM share), re-exported, and what only the VMM does with it:
//! turning an embedded kernel's name into its bytes.

pub use wv_config::*;

// The configuration's floor is the machine model's: a VM that passes validation can be laid out.
const _: () = assert!(wv_config::MIN_MEMORY == wv_machine::layout::MIN_MEMORY);

/// The kernel image `k` names: a file, or an image embedded in `wv` (wv-probe-images).
pub fn kernel_image(k: &KernelSource) -> Result<wv_machine::KernelImage, ConfigError> {
    match k {
        KernelSource::Path(p) => Ok(wv_machine::KernelImage::File(p.clone())),
        KernelSource::Embedded(name) => {
            let known = EMBEDDED_KERNELS.iter().find(|n| **n == name.as_str());
            match known.and_then(|n| Some((*n, embedded(n)?))) {
                Some((n, bytes)) => Ok(wv_machine::KernelImage::Embedded(n, bytes)),
                None => Err(ConfigError(format!(
                    "kernel: no embedded image is named '{}' (there are {})",
                    name.escape_debug(),
                    EMBEDDED_KERNELS.join(", ")
                ))),
            }
        }
    }
}

/// The embedded image `name` (none in a build without the `embedded-images` feature).
#[cfg(feature = "embedded-images")]
fn embedded(name: &str) -> Option<&'static [u8]> {
    wv_probe_images::by_name(name)
}

/// The embedded image `name` (none in a build without the `embedded-images` feature).
#[cfg(not(feature = "embedded-images"))]
fn embedded(_name: &str) -> Option<&'static [u8]> {
    None
}

#[cfg(all(test, feature = "embedded-images"))]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_name_is_an_image() {
        for n in EMBEDDED_KERNELS {
            let k = kernel_image(&KernelSource::Embedded(n.to_string())).unwrap();
            assert!(
                matches!(k, wv_machine::KernelImage::Embedded(m, b) if m == *n && !b.is_empty())
            );
        }
        let Err(e) = kernel_image(&KernelSource::Embedded("nope".into())) else {
            panic!("an unknown embedded image was found");
        };
        assert!(e.0.contains("'nope'"), "{e}");
    }
}
