//! Errors as the command line says them: the library names its options (`Type::field`),
//! the command line names its flags.

use diskconv::Error;

/// The library's option names (`Type::field`, which its messages use) spelled as this
/// command line's flags, longest first so no name is a prefix of a later one.
const FLAGS: &[(&str, &str)] = &[
    ("ConvertOptions::existing_target", "-n"),
    ("ConvertOptions::target_is_zero", "--target-is-zero"),
    ("OpenOptions::allow_references", "--allow-references"),
    (
        "ConvertOptions::target_size",
        "diskconv convert --target-size SIZE",
    ),
    ("ConvertOptions::shrink", "--shrink"),
    ("ResizeOptions::shrink", "--shrink"),
];

/// An error as the command line says it: in one line, with its flags where the library
/// names its options ("set ConvertOptions::shrink" reads "set --shrink").
pub fn cli_message(e: &Error) -> String {
    let mut msg = e.to_string();
    for (opt, flag) in FLAGS {
        msg = msg.replace(opt, flag);
    }
    msg
}
