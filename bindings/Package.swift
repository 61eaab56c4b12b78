// swift-tools-version:5.9
// Swift package of the Herald SDK. Build the inputs first (see bindings/README.md,
// "iOS: XCFramework and Swift package"): `apple/HeraldFFI.xcframework` (the Rust static
// library + C header + module map) and `apple/Sources/Herald/Herald.swift` (generated).
import PackageDescription

let package = Package(
    name: "Herald",
    platforms: [.iOS(.v16), .macOS(.v13)],
    products: [
        .library(name: "Herald", targets: ["Herald"]),
    ],
    targets: [
        .binaryTarget(
            name: "HeraldFFI",
            path: "apple/HeraldFFI.xcframework"
        ),
        .target(
            name: "Herald",
            dependencies: ["HeraldFFI"],
            path: "apple/Sources/Herald"
        ),
    ]
)
