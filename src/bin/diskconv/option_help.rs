//! `-o help` (`convert`, `create`): a format's creation options in qemu-img's layout.

use diskconv::Format;

/// `-o help` in qemu-img's layout: `  name=<type>` padded to 22 columns, ` - `, the help.
pub fn print(format: Format) {
    println!("Supported {format} options:");
    for o in format.create_options() {
        let kind = match o.kind {
            "string" => "str",
            "number" => "num",
            "bool" => "bool (on/off)",
            k => k,
        };
        let left = format!("{}=<{kind}>", o.name);
        println!("  {left:<22} - {}", o.help);
    }
}

/// Whether the `-o` options ask for the help instead (`help` or `?`, as qemu-img takes).
pub fn asked(create: &diskconv::CreateOptions) -> bool {
    create.options.contains_key("help") || create.options.contains_key("?")
}
